"""Synthetic models for ``olmo-local bench --synthetic``: random weights of a preset shape, built
directly on the device in the requested format. No disk, no download.

The model is built one linear at a time: each dense random weight is generated on the device in the
model dtype and, for a quantized format, quantized there at once and dropped, so peak memory stays
around the quantized model + one (fused) dense weight; a 7B q4 never has its 14.9 GB bf16 form in
memory. Quantization is plain round-to-nearest (quality is meaningless for random weights; the
searched quantizer would only slow the build). Which linears are quantized follows
``bench_roofline.linear_format`` (a|b kept in the model dtype, q8 head), so the measured bytes equal
``bench_roofline.format_weight_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from olmo_local.bench_roofline import linear_format, q4_group_for
from olmo_local.config import FULL, OlmoHybridConfig
from olmo_local.errors import OlmoError

FORMATS = ("bf16", "q8", "q4", "nf4")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise OlmoError(f"unknown --format {fmt!r} (use {', '.join(FORMATS)})")
    if fmt == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise OlmoError("--format nf4 needs bitsandbytes (pip install bitsandbytes)") from None


def make_linear(w: torch.Tensor, fmt: str, group_size: int = 128) -> nn.Module:
    """Turn a dense weight [N, K] (on its device) into a linear module of ``fmt``."""
    from olmo_local.quant.formats import quantize_nf4, quantize_q4, quantize_q8
    from olmo_local.quant.linear import DenseLinear, NF4Linear, Q4Linear, Q8Linear

    if fmt == "bf16":
        return DenseLinear(w)
    if fmt == "q8":  # group scales as ``olmo-local quantize`` writes them
        from olmo_local.bench_roofline import Q8_GROUP
        from olmo_local.quant.formats import q8_group_for

        d = quantize_q8(w, search=False, group_size=q8_group_for(w.shape[1], Q8_GROUP))
        return Q8Linear(d["qweight"], d["scales"])
    if fmt == "q4":
        g = q4_group_for(w.shape[1], group_size)
        d = quantize_q4(w, g, search=False)
        return Q4Linear(d["qweight"], d["scales"], d["mins"], g)
    if fmt == "nf4":
        d = quantize_nf4(w)
        return NF4Linear(d["qweight"], d["quant_state"])
    raise OlmoError(f"unknown weight format {fmt!r}")


@torch.no_grad()
def build_synthetic(cfg: OlmoHybridConfig, device: torch.device | str, fmt: str = "bf16",
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0, group_size: int = 128,
                    head_fmt: str = "q8", progress: Callable[[int, int], None] | None = None):
    """A random OlmoHybridModel of ``cfg`` on ``device`` with linears stored in ``fmt``."""
    from olmo_local.model import MLP, AttentionLayer, Embedding, GDNLayer, Norm, OlmoHybridModel
    from olmo_local.quant.formats import quantize_q8

    check_format(fmt)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(std)

    def uniform(n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=device, dtype=torch.float32, generator=gen) * (hi - lo) + lo

    def lin(kind: str, n: int, k: int) -> nn.Module:
        w = randn(n, k)
        m = make_linear(w, linear_format(kind, fmt, head_fmt), group_size)
        del w
        return m

    def norm(n: int) -> Norm:
        return Norm(torch.ones(n, device=device, dtype=dtype), cfg.rms_norm_eps)

    d, inter = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hv, K = cfg.linear_num_value_heads, cfg.linear_conv_kernel_dim
    layers: list[nn.Module] = []
    a_i = g_i = 0
    n_layers = len(cfg.layer_types)
    for i, t in enumerate(cfg.layer_types):
        if t == FULL:
            qkv, o = lin("linear", (H + 2 * KV) * hd, d), lin("linear", d, H * hd)
            mlp = MLP(lin("linear", 2 * inter, d), lin("linear", d, inter))
            layers.append(AttentionLayer(cfg, a_i, qkv, o, norm(H * hd), norm(KV * hd), norm(d), norm(d), mlp))
            a_i += 1
        else:
            qkvz, ab = lin("linear", cfg.conv_dim + cfg.value_dim, d), lin("ab", 2 * hv, d)
            o = lin("linear", d, cfg.value_dim)
            mlp = MLP(lin("linear", 2 * inter, d), lin("linear", d, inter))
            conv = (torch.rand(cfg.conv_dim, K, device=device, dtype=torch.float32, generator=gen) - 0.5)
            A_log = uniform(hv, 1.0, 16.0).log()
            dt = torch.exp(uniform(hv, math.log(0.001), math.log(0.1))).clamp(min=1e-4)
            dt_bias = dt + torch.log(-torch.expm1(-dt))
            layers.append(GDNLayer(cfg, g_i, norm(d), qkvz, ab, conv.to(dtype), A_log, dt_bias,
                                   torch.ones(cfg.linear_value_head_dim, device=device, dtype=dtype), o,
                                   norm(d), mlp))
            g_i += 1
        if progress:
            progress(i + 1, n_layers + 1)
    from olmo_local.bench_roofline import Q8_GROUP, embed_format

    if embed_format(cfg, fmt) == "q8":  # as quantize stores it: only looked-up rows are dequantized
        from olmo_local.quant.formats import q8_group_for
        from olmo_local.quant.linear import QEmbedding

        table = randn(cfg.vocab_size, d)
        q = quantize_q8(table, search=False, group_size=q8_group_for(d, Q8_GROUP))
        embed = QEmbedding(q["qweight"], q["scales"], dtype)
        del table, q
    else:
        embed = Embedding(randn(cfg.vocab_size, d))
    lm_head = None if cfg.tie_word_embeddings else lin("lm_head", cfg.vocab_size, d)
    model = OlmoHybridModel(cfg, layers, embed, norm(d), lm_head).eval()
    if device.type == "cuda":  # as load_model does: q4 linears in the decode GEMV's tiled layout
        from olmo_local.quant.linear import tile_q4_layers

        tile_q4_layers(model)
    if progress:
        progress(n_layers + 1, n_layers + 1)
    return model
