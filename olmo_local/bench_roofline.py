"""The decode roofline: bytes each generated token must move, and the device's copy bandwidth.

Decode at batch 1 is memory-bound (design.md, performance model). A token reads every stored weight
once (all linear layers, the lm_head, norms, conv weights, gates) but only ONE row of the embedding
table, the KV cache of the attention layers up to the current depth, and reads + writes the fixed
recurrent + conv state. Ceiling tokens/s = measured copy bandwidth / those bytes.

Weights are counted by *kind* so the same arithmetic serves a loaded model (``model_weight_bytes``
measures its modules) and a format on paper (``format_weight_bytes`` counts a config):

- ``linear``    the big projections as the model fuses them (attention q|k|v and o, GDN q|k|v|z and o,
                MLP gate|up and down): these are what --format quantizes
- ``ab``        the GDN a|b projection (kept high precision: it feeds the gates)
- ``lm_head``   the output head (absent when tied to the embedding)
- ``other``     norms, conv weights, A_log, dt_bias, o_norm (A_log/dt_bias are fp32 in memory)
- ``embedding`` the token table: one row per token is read, not the table
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from olmo_local.config import FULL, OlmoHybridConfig
from olmo_local.errors import OlmoError

KINDS = ("linear", "ab", "lm_head", "other", "embedding")
Q4_GROUPS = (128, 64, 32)


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- what a format stores ------------------------------------------------------------------------
def q4_group_for(in_features: int, requested: int = 128) -> int:
    """The q4 group size used for a linear with ``in_features`` inputs: the requested one if it divides
    K, else the largest of 128/64/32 that does (the tiny preset has K = 64 and 160)."""
    if in_features % requested == 0:
        return requested
    for g in Q4_GROUPS:
        if g < requested and in_features % g == 0:
            return g
    raise OlmoError(f"q4: in_features {in_features} is not a multiple of 32; use --format q8 or bf16")


def linear_format(kind: str, fmt: str, head_fmt: str = "q8") -> str:
    """The storage format of a linear of ``kind`` in a model quantized to ``fmt`` (bench's synthetic
    models; the quantize tool uses the same policy): a|b stays in the model dtype, the head is q8."""
    if fmt == "bf16" or kind == "ab":
        return "bf16"
    if kind == "lm_head":
        return head_fmt
    return fmt


Q8_GROUP = 128  # what ``olmo-local quantize`` writes for q8 tables (linears, lm_head, embedding)


def q8_nbytes(n: int, k: int) -> int:
    """int8 [n, k] + fp16 scales per group of q8_group_for(k, 128) inputs (per row when none divides k)."""
    from olmo_local.quant.formats import q8_group_for

    g = q8_group_for(k, Q8_GROUP)
    return n * k + 2 * n * (k // g if g else 1)


def linear_nbytes(fmt: str, n: int, k: int, dtype: torch.dtype = torch.bfloat16, group_size: int = 128) -> int:
    """Bytes a linear [n, k] occupies in ``fmt`` (exactly what the quant modules hold as buffers).

    bf16: n*k*elem · q8: n*k int8 + fp16 scales per group of 128 (``q8_nbytes``) · q4: n*k/2 packed +
    fp16 scale and min per group · nf4: n*k/2 packed + one fp32 absmax per 64 weights + the 16-entry
    fp32 code table."""
    if fmt == "bf16":
        return n * k * esize(dtype)
    if fmt == "q8":
        return q8_nbytes(n, k)
    if fmt == "q4":
        g = q4_group_for(k, group_size)
        return n * k // 2 + 2 * 2 * n * (k // g)
    if fmt == "nf4":
        return (n * k + 1) // 2 + 4 * -(-(n * k) // 64) + 16 * 4
    raise OlmoError(f"unknown weight format {fmt!r} (use bf16, q8, q4 or nf4)")


def linear_inventory(cfg: OlmoHybridConfig) -> list[tuple[str, int, int]]:
    """(kind, out, in) of every linear module as OlmoHybridModel fuses them, in layer order."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: list[tuple[str, int, int]] = []
    for t in cfg.layer_types:
        if t == FULL:
            out += [("linear", (H + 2 * KV) * hd, d), ("linear", d, H * hd)]
        else:
            out += [("linear", cfg.conv_dim + cfg.value_dim, d), ("ab", 2 * cfg.linear_num_value_heads, d),
                    ("linear", d, cfg.value_dim)]
        out += [("linear", 2 * inter, d), ("linear", d, inter)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head", cfg.vocab_size, d))
    return out


def other_nbytes(cfg: OlmoHybridConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Norms, conv weights, o_norm in the model dtype; A_log and dt_bias in fp32."""
    d, e = cfg.hidden_size, esize(dtype)
    n = d  # final norm
    n += len(cfg.attn_layers) * (cfg.num_attention_heads * cfg.head_dim + cfg.num_key_value_heads * cfg.head_dim
                                 + 2 * d)
    n += len(cfg.gdn_layers) * (2 * d + cfg.conv_dim * cfg.linear_conv_kernel_dim + cfg.linear_value_head_dim)
    return n * e + len(cfg.gdn_layers) * 2 * cfg.linear_num_value_heads * 4


def embed_format(cfg: OlmoHybridConfig, fmt: str) -> str:
    """The embedding table's format in a model quantized to ``fmt``, as ``olmo-local quantize`` stores
    it by default: q8 for q4/q8 models, the model dtype for bf16 and nf4 (and for a tied table, which
    the synthetic model keeps dense so the head can read it)."""
    return "q8" if fmt in ("q4", "q8") and not cfg.tie_word_embeddings else "bf16"


def format_weight_bytes(cfg: OlmoHybridConfig, fmt: str, dtype: torch.dtype = torch.bfloat16,
                        group_size: int = 128, head_fmt: str = "q8") -> dict[str, int]:
    """Bytes by kind of a model of ``cfg`` stored in ``fmt`` (policy: ``linear_format``, ``embed_format``).
    Equals ``model_weight_bytes`` of bench's synthetic model of that format."""
    out = dict.fromkeys(KINDS, 0)
    for kind, n, k in linear_inventory(cfg):
        out[kind] += linear_nbytes(linear_format(kind, fmt, head_fmt), n, k, dtype, group_size)
    out["other"] = other_nbytes(cfg, dtype)
    if embed_format(cfg, fmt) == "q8":
        out["embedding"] = q8_nbytes(cfg.vocab_size, cfg.hidden_size)
    else:
        out["embedding"] = cfg.vocab_size * cfg.hidden_size * esize(dtype)
    return out


def _tensors_nbytes(mod: torch.nn.Module, seen: set[int]) -> int:
    total = 0
    for t in list(mod.parameters()) + list(mod.buffers()):
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def model_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes by kind that a loaded (or synthetic) OlmoHybridModel holds, measured on its tensors."""
    from olmo_local.model import GDNLayer

    seen: set[int] = set()
    out = dict.fromkeys(KINDS, 0)
    out["embedding"] = _tensors_nbytes(model.embed, seen)
    if model.lm_head is not None:
        out["lm_head"] = _tensors_nbytes(model.lm_head, seen)
    for layer in model.layers:
        if isinstance(layer, GDNLayer):
            out["ab"] += _tensors_nbytes(layer.ab, seen)
            mods = [layer.qkvz, layer.o]
        else:
            mods = [layer.qkv, layer.o]
        for m in mods + [layer.mlp.gate_up, layer.mlp.down]:
            out["linear"] += _tensors_nbytes(m, seen)
    out["other"] = _tensors_nbytes(model, seen)  # everything not counted above
    return out


# ---- bytes per decode token ----------------------------------------------------------------------
def kv_bytes_per_token(cfg: OlmoHybridConfig, kv_dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V of every attention layer for one position; int8 KV adds one fp32 scale per head."""
    per_head = cfg.head_dim * esize(kv_dtype) + (4 if kv_dtype == torch.int8 else 0)
    return 2 * len(cfg.attn_layers) * cfg.num_key_value_heads * per_head


def state_bytes(cfg: OlmoHybridConfig, conv_dtype: torch.dtype = torch.bfloat16) -> int:
    """The fixed per-sequence state: GDN conv state (model dtype) + recurrent state (fp32)."""
    nG = len(cfg.gdn_layers)
    conv = nG * cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * esize(conv_dtype)
    rec = nG * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return conv + rec


def decode_bytes_per_token(cfg: OlmoHybridConfig, weight_bytes: Mapping[str, int], depth: float,
                           kv_dtype: torch.dtype = torch.bfloat16, state_dtype: torch.dtype | None = None) -> int:
    """Bytes one decode step must move at context ``depth``:

    every stored weight except the embedding table (of which one row is read; all of it when the head
    is tied to it) + KV of the attention layers for ``depth`` positions + the recurrent and conv state
    read once and written once. ``state_dtype`` (conv state) defaults to ``kv_dtype`` unless that is
    int8 (then bf16)."""
    unknown = set(weight_bytes) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown weight kinds {sorted(unknown)} (expected {KINDS})")
    emb = weight_bytes.get("embedding", 0)
    weights = sum(v for k, v in weight_bytes.items() if k != "embedding")
    weights += emb if cfg.tie_word_embeddings else emb // cfg.vocab_size
    if state_dtype is None:
        state_dtype = torch.bfloat16 if kv_dtype == torch.int8 else kv_dtype
    kv = kv_bytes_per_token(cfg, kv_dtype) * depth
    return int(weights + kv + 2 * state_bytes(cfg, state_dtype))


# ---- device copy bandwidth -----------------------------------------------------------------------
def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read + written: the best of ``iters``
    timed copies after three untimed ones. The best, not the median: no copy runs faster than the
    memory allows, while slow outliers (clocks ramping after a pause, another process) would lower
    the ceiling and flatter the % of roofline; one H100 run's median came out 9 % low.

    Default size: 1 GiB on CUDA (less when memory is short), 256 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = max(2**20, min(nbytes, free // 4))
    n = nbytes // 16 * 16
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times: list[float] = []
    for _ in range(3):
        dst.copy_(src)
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / min(times)
