"""``bench --compare hf|hf-nf4``: the same weights through transformers' OlmoHybridForCausalLM, in the
same process, timed by the same runner as olmo-local.

``hf`` is transformers in bf16; ``hf-nf4`` is transformers + bitsandbytes 4-bit
(``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, bf16 compute) with the lm_head
and the GDN a/b projections left in bf16 — as olmo-local's own formats leave a/b (one row per value head:
bitsandbytes' CPU kernel also needs rows in multiples of 32, which 16 or 30 heads are not). The model is
built by ``from_pretrained(None, config=..., state_dict=...)`` from our model's tensors (dequantized to
bf16 if ours is quantized), so no file is written. Decode uses its cache (``use_cache=True``), one token
per forward.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import torch

from olmo_local.config import FULL
from olmo_local.errors import OlmoError

COMPARES = ("hf", "hf-nf4")
NF4_SKIP = ("lm_head", "a_proj", "b_proj")  # kept in bf16 by --compare hf-nf4 (see above)


def require(kind: str) -> None:
    """Fail with one clear line when the engine to compare with is not installed."""
    if kind not in COMPARES:
        raise OlmoError(f"unknown --compare {kind!r} (use {' or '.join(COMPARES)})")
    try:
        import transformers
    except ImportError:
        raise OlmoError(f"--compare {kind} needs transformers: pip install 'olmo-local[hf]'") from None
    if not hasattr(transformers, "OlmoHybridForCausalLM"):
        raise OlmoError(f"--compare {kind}: transformers {transformers.__version__} has no "
                        "OlmoHybridForCausalLM; upgrade it (pip install -U 'olmo-local[hf]')")
    if kind == "hf-nf4":  # transformers' bitsandbytes 4-bit path also needs accelerate
        missing = [m for m in ("bitsandbytes", "accelerate") if not _importable(m)]
        if missing:
            raise OlmoError(f"--compare hf-nf4 needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _deq(mod: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return mod.dequantize(dtype)


@torch.no_grad()
def hf_tensors(model, dtype: torch.dtype = torch.bfloat16, fused_conv: bool = True) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' names, in ``dtype`` (dense weights of that dtype are
    shared, not copied; quantized ones are dequantized one module at a time)."""
    cfg = model.config
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    emb = model.embed.weight.data.to(dtype) if hasattr(model.embed, "weight") else _deq(model.embed, dtype)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb,
                                    "model.norm.weight": model.norm.weight.data.to(dtype)}
    if model.lm_head is not None:
        out["lm_head.weight"] = _deq(model.lm_head, dtype)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        gate, up = _deq(layer.mlp.gate_up, dtype).chunk(2, 0)
        out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": _deq(layer.mlp.down, dtype)})
        if cfg.layer_types[i] == FULL:
            q, k, v = _deq(layer.qkv, dtype).split([H * hd, KV * hd, KV * hd], 0)
            s = p + "self_attn."
            out.update({s + "q_proj.weight": q, s + "k_proj.weight": k, s + "v_proj.weight": v,
                        s + "o_proj.weight": _deq(layer.o, dtype),
                        s + "q_norm.weight": layer.q_norm.weight.data.to(dtype),
                        s + "k_norm.weight": layer.k_norm.weight.data.to(dtype),
                        p + "post_attention_layernorm.weight": layer.post_attn_norm.weight.data.to(dtype),
                        p + "post_feedforward_layernorm.weight": layer.post_ff_norm.weight.data.to(dtype)})
        else:
            s = p + "linear_attn."
            q, k, v, g = _deq(layer.qkvz, dtype).split([cfg.key_dim, cfg.key_dim, cfg.value_dim,
                                                        cfg.value_dim], 0)
            a, b = _deq(layer.ab, dtype).chunk(2, 0)
            conv = layer.conv_w.data.to(dtype).unsqueeze(1)  # [conv_dim, 1, K]
            if fused_conv:
                out[s + "conv1d.weight"] = conv
            else:
                cq, ck, cv = conv.split([cfg.key_dim, cfg.key_dim, cfg.value_dim], 0)
                out.update({s + "q_conv1d.weight": cq, s + "k_conv1d.weight": ck, s + "v_conv1d.weight": cv})
            out.update({s + "q_proj.weight": q, s + "k_proj.weight": k, s + "v_proj.weight": v,
                        s + "g_proj.weight": g, s + "a_proj.weight": a, s + "b_proj.weight": b,
                        s + "o_proj.weight": _deq(layer.o, dtype), s + "A_log": layer.A_log.data.float(),
                        s + "dt_bias": layer.dt_bias.data.float(),
                        s + "o_norm.weight": layer.o_norm_w.data.to(dtype),
                        p + "input_layernorm.weight": layer.in_norm.weight.data.to(dtype),
                        p + "post_attention_layernorm.weight": layer.post_norm.weight.data.to(dtype)})
    return out


def hf_config(cfg):
    from transformers import OlmoHybridConfig as HFConfig

    d = cfg.to_dict()
    d.pop("quantization_config", None)  # ours, not transformers'
    if cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads:
        d.pop("head_dim", None)
    return HFConfig.from_dict(d)


def build_hf(model, kind: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """transformers' OlmoHybridForCausalLM (``dtype``, or bitsandbytes nf4 with bf16 compute) holding
    ``model``'s weights. ``dtype`` fp32 gives the reference (scripts/gpu_parity.py)."""
    from transformers import OlmoHybridForCausalLM

    require(kind)
    hcfg = hf_config(model.config)
    with torch.device("meta"):
        keys = set(OlmoHybridForCausalLM(hcfg).state_dict())
    fused = any(k.endswith("linear_attn.conv1d.weight") for k in keys)
    sd = hf_tensors(model, dtype if kind == "hf" else torch.bfloat16, fused_conv=fused)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    try:
        if kind == "hf":
            hf = _dense_hf(hcfg, sd, device, dtype)
        else:
            hf = _nf4_hf(hcfg, sd, device)
    except torch.cuda.OutOfMemoryError:
        raise OlmoError(f"--compare {kind}: not enough GPU memory for transformers' model beside ours") from None
    del sd
    return hf.eval()


def _dense_hf(hcfg, sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """Construct on the device in ``dtype`` (transformers' own init, then overwritten) and load the tensors."""
    from transformers import OlmoHybridForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = OlmoHybridForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(old)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (hcfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise OlmoError(f"--compare hf: transformers' model does not take our tensors (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}); is transformers too old or too new?")
    return hf


def _nf4_hf(hcfg, sd: dict[str, torch.Tensor], device: torch.device):
    """transformers' bitsandbytes 4-bit load path (BitsAndBytesConfig nf4) from an in-memory state dict."""
    from transformers import BitsAndBytesConfig, OlmoHybridForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           llm_int8_skip_modules=list(NF4_SKIP))
    kw: dict = dict(config=hcfg, state_dict=sd, dtype=torch.bfloat16, quantization_config=q)
    kw["device_map"] = {"": str(device)}
    return OlmoHybridForCausalLM.from_pretrained(None, **kw)


class HFEngine:
    """The bench runner's engine interface over a transformers model and its cache."""

    def __init__(self, hf, kind: str, device: torch.device, prefill_chunk: int = 2048) -> None:
        self.hf, self.name, self.device = hf, kind, torch.device(device)
        self.prefill_chunk = prefill_chunk
        params = inspect.signature(hf.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self._base = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.cache = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        kw = {"use_cache": True, "logits_to_keep": 1}
        if self.cache is not None:
            kw[self._cache_kw] = self.cache
        out = self.hf(ids, **kw)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` after what the cache holds (in chunks); logits after the last one."""
        logits = None
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[s:s + self.prefill_chunk]], device=self.device)
            logits = self._forward(chunk)
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        return self._forward(torch.tensor([[token]], device=self.device))

    def greedy(self, token: int) -> int:
        return int(self.step(token).argmax())

    def first_token_s(self, ids: list[int]) -> float:
        import time

        self.reset()
        self.sync()
        t0 = time.perf_counter()
        int(self.prefill(ids).argmax())
        return time.perf_counter() - t0

    def fill(self, ids: list[int]) -> None:
        self.reset()
        self.prefill(ids)
        self._base = self.cache

    def restore(self) -> None:
        self.cache = copy.deepcopy(self._base)

    def drop_fill(self) -> None:
        self._base = self.cache = None
