"""Checkpoint tensor names of quantized linears, and loading a linear from whatever names exist.

For a linear stored as ``PREFIX.weight`` (bf16) in the source checkpoint:

- q4:  ``PREFIX.qweight`` uint8 [N, K/2], ``PREFIX.scales`` fp16 [N, K/G], ``PREFIX.mins`` fp16 [N, K/G]
- q8:  ``PREFIX.qweight`` int8 [N, K], ``PREFIX.scales`` fp16 [N, K/G] (G = 32/64/128), or fp16 [N]
  (one scale per row: written by olmo-local before group scales, and by ``--group-size 0``)
- nf4: exactly what transformers + bitsandbytes write for a Linear4bit: ``PREFIX.weight`` uint8
  [N*K/2, 1], ``PREFIX.weight.absmax``, ``PREFIX.weight.quant_map``,
  ``PREFIX.weight.quant_state.bitsandbytes__nf4`` (JSON packed as uint8), and with double quant
  ``PREFIX.weight.nested_absmax``, ``PREFIX.weight.nested_quant_map``.
- bitsandbytes int8 (read only): ``PREFIX.weight`` int8 [N, K], ``PREFIX.SCB`` fp32 [N]
  (optional ``PREFIX.weight_format``, must be 0 = row-major); loaded as a Q8Linear with SCB/127.
- dense: ``PREFIX.weight`` float [N, K].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from olmo_local.errors import OlmoError

from ._bnb import bnb_functional
from .formats import Q4_GROUP_SIZES, Q8_GROUP_SIZES, q8_group_for, quantize_nf4, quantize_q4, quantize_q8
from .linear import DenseLinear, NF4Linear, Q4Linear, Q8Linear, QEmbedding

FORMATS = ("q4", "q8", "nf4", "nf4-dq", "bf16")
_BNB_4BIT_TYPES = ("nf4", "fp4")


def _norm_fmt(fmt: str, double_quant: bool) -> tuple[str, bool]:
    if fmt in ("nf4-dq", "nf4dq"):
        return "nf4", True
    if fmt in ("bf16", "dense", "fp16", "fp32"):
        return "dense", False
    if fmt in ("q4", "q8", "nf4", "bnb-int8"):
        return fmt, double_quant
    raise OlmoError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")


def expected_names(prefix: str, fmt: str, double_quant: bool = False) -> list[str]:
    """Tensor names a linear at ``prefix`` must have in a checkpoint of format ``fmt``."""
    fmt, dq = _norm_fmt(fmt, double_quant)
    p = prefix
    if fmt == "q4":
        return [f"{p}.qweight", f"{p}.scales", f"{p}.mins"]
    if fmt == "q8":
        return [f"{p}.qweight", f"{p}.scales"]
    if fmt == "nf4":
        names = [f"{p}.weight", f"{p}.weight.absmax", f"{p}.weight.quant_map"]
        if dq:
            names += [f"{p}.weight.nested_absmax", f"{p}.weight.nested_quant_map"]
        return names + [f"{p}.weight.quant_state.bitsandbytes__nf4"]
    if fmt == "bnb-int8":
        return [f"{p}.weight", f"{p}.SCB"]
    return [f"{p}.weight"]


def quantize_linear_tensors(
    prefix: str, weight: torch.Tensor, fmt: str, group_size: int = 128, double_quant: bool = False
) -> dict[str, torch.Tensor]:
    """Quantize one linear's weight [N, K]; returns checkpoint names -> tensors to write.

    q8 uses the largest group size of 128/64/32 that is at most ``group_size`` and divides K, and one
    scale per row when none does or ``group_size`` is 0 (quant.formats.q8_group_for)."""
    fmt, dq = _norm_fmt(fmt, double_quant)
    p = prefix
    if fmt == "q4":
        d = quantize_q4(weight, group_size)
        return {f"{p}.qweight": d["qweight"], f"{p}.scales": d["scales"], f"{p}.mins": d["mins"]}
    if fmt == "q8":
        d = quantize_q8(weight, group_size=q8_group_for(weight.shape[1], group_size))
        return {f"{p}.qweight": d["qweight"], f"{p}.scales": d["scales"]}
    if fmt == "nf4":
        d = quantize_nf4(weight, double_quant=dq)
        out = {f"{p}.weight": d["qweight"]}
        for k, v in d["quant_state"].as_dict(packed=True).items():
            out[f"{p}.weight.{k}"] = v
        return out
    if fmt == "bnb-int8":
        raise OlmoError("writing bitsandbytes int8 is not supported; use q8 (same bits, fp16 scales)")
    return {f"{p}.weight": weight}


# --------------------------------------------------------------------------------------------- #
# loading


def _bad(prefix: str, msg: str) -> OlmoError:
    return OlmoError(f"corrupt checkpoint: linear {prefix}: {msg}; re-download or re-quantize the model")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _need(get: Callable[[str], torch.Tensor], has: Callable[[str], bool], name: str, prefix: str) -> torch.Tensor:
    if not has(name):
        raise _bad(prefix, f"missing tensor {name}")
    return get(name)


def load_linear(
    get: Callable[[str], torch.Tensor],
    has: Callable[[str], bool],
    prefix: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Build the linear stored under ``prefix`` from whichever tensor names exist.

    Returns DenseLinear (weight cast to ``dtype``), Q4Linear, Q8Linear (also for bitsandbytes
    int8) or NF4Linear (bitsandbytes nf4/fp4), with tensors on ``device``. Raises OlmoError when
    tensors are missing or have inconsistent shapes/dtypes.
    """
    p = prefix
    if has(f"{p}.qweight"):
        qweight = get(f"{p}.qweight")
        if has(f"{p}.mins"):
            return _load_q4(p, qweight, _need(get, has, f"{p}.scales", p), get(f"{p}.mins"), device)
        return _load_q8(p, qweight, _need(get, has, f"{p}.scales", p), device)
    qs_keys = [f"{p}.weight.quant_state.bitsandbytes__{t}" for t in _BNB_4BIT_TYPES]
    if has(f"{p}.weight.absmax") or any(has(k) for k in qs_keys):
        return _load_bnb4(get, has, p, device)
    if has(f"{p}.SCB"):
        return _load_bnb8(get, has, p, device)
    if has(f"{p}.weight"):
        w = get(f"{p}.weight")
        if w.dim() != 2 or not w.is_floating_point():
            raise _bad(p, f"weight has shape {_shape(w)} and dtype {w.dtype}, expected a 2-D float matrix")
        return DenseLinear(w.to(device=device, dtype=dtype))
    raise _bad(p, f"missing tensor {p}.weight (or a quantized form: {p}.qweight)")


def _load_q4(p: str, qweight, scales, mins, device) -> Q4Linear:
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise _bad(p, f"q4 qweight must be uint8 [N, K/2], got {qweight.dtype} {_shape(qweight)}")
    for name, t in (("scales", scales), ("mins", mins)):
        if t.dtype != torch.float16 or t.dim() != 2:
            raise _bad(p, f"q4 {name} must be fp16 [N, K/G], got {t.dtype} {_shape(t)}")
    if scales.shape != mins.shape:
        raise _bad(p, f"q4 scales {_shape(scales)} and mins {_shape(mins)} differ in shape")
    n, ng = scales.shape
    k = 2 * qweight.shape[1]
    if qweight.shape[0] != n or ng == 0 or k % ng or (k // ng) not in Q4_GROUP_SIZES:
        raise _bad(
            p,
            f"q4 qweight {_shape(qweight)} does not fit scales {_shape(scales)} "
            f"(expected [N, K/2] with K/G groups, G in {Q4_GROUP_SIZES})",
        )
    return Q4Linear(qweight.to(device), scales.to(device), mins.to(device), k // ng)


def _load_q8(p: str, qweight, scales, device) -> Q8Linear:
    """q8 with group scales fp16 [N, K/G] or per-row scales float [N] (told apart by the rank)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise _bad(p, f"q8 qweight must be int8 [N, K], got {qweight.dtype} {_shape(qweight)}")
    n, k = qweight.shape
    if scales.dim() == 2:
        ng = scales.shape[1]
        if scales.dtype != torch.float16 or scales.shape[0] != n or ng == 0 or k % ng \
                or k // ng not in Q8_GROUP_SIZES:
            raise _bad(p, f"q8 group scales must be fp16 [{n}, K/G] with G in {Q8_GROUP_SIZES} dividing "
                          f"K = {k}, got {scales.dtype} {_shape(scales)}")
    elif not scales.is_floating_point() or _shape(scales) != (n,):
        raise _bad(p, f"q8 scales must be fp16 [{n}, K/G] (groups) or float [{n}] (rows), got "
                      f"{scales.dtype} {_shape(scales)}")
    return Q8Linear(qweight.to(device), scales.to(device))


def _load_bnb8(get, has, p: str, device) -> Q8Linear:
    w = _need(get, has, f"{p}.weight", p)
    scb = get(f"{p}.SCB")
    if has(f"{p}.weight_format"):
        wf = get(f"{p}.weight_format")
        if int(wf.reshape(-1)[0]) != 0:
            raise _bad(p, f"bitsandbytes int8 weight_format {int(wf.reshape(-1)[0])} is not row-major (0)")
    if w.dtype != torch.int8 or w.dim() != 2:
        raise _bad(p, f"bitsandbytes int8 weight must be int8 [N, K], got {w.dtype} {_shape(w)}")
    if not scb.is_floating_point() or _shape(scb) != (w.shape[0],):
        raise _bad(p, f"bitsandbytes SCB must be float [{w.shape[0]}], got {scb.dtype} {_shape(scb)}")
    return Q8Linear(w.to(device), (scb.float() / 127.0).to(device))


def _load_bnb4(get, has, p: str, device) -> NF4Linear:
    QuantState = bnb_functional().QuantState

    w = _need(get, has, f"{p}.weight", p)
    qs_dict: dict[str, torch.Tensor] = {}
    for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        if has(f"{p}.weight.{k}"):
            qs_dict[k] = get(f"{p}.weight.{k}")
    packed = [t for t in _BNB_4BIT_TYPES if has(f"{p}.weight.quant_state.bitsandbytes__{t}")]
    if len(packed) != 1:
        raise _bad(p, f"expected exactly one {p}.weight.quant_state.bitsandbytes__nf4 (or __fp4) tensor")
    for k in ("absmax", "quant_map"):
        if k not in qs_dict:
            raise _bad(p, f"missing tensor {p}.weight.{k}")
    if ("nested_absmax" in qs_dict) != ("nested_quant_map" in qs_dict):
        raise _bad(p, "double-quant state needs both weight.nested_absmax and weight.nested_quant_map")
    qs_dict[f"quant_state.bitsandbytes__{packed[0]}"] = get(f"{p}.weight.quant_state.bitsandbytes__{packed[0]}")
    try:
        qs = QuantState.from_dict(qs_dict, device=torch.device(device))
    except Exception as e:  # noqa: BLE001 - bad JSON, missing keys, unknown dtype names...
        raise _bad(p, f"unreadable bitsandbytes quant state ({type(e).__name__}: {e})") from None
    if qs.shape is None or len(qs.shape) != 2:
        raise _bad(p, f"bitsandbytes quant state has shape {qs.shape}, expected [N, K]")
    if qs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _bad(p, f"bitsandbytes quant state dtype {qs.dtype} is not a float type")
    n, k = qs.shape
    numel = n * k
    if w.dtype != torch.uint8 or w.numel() != (numel + 1) // 2:
        raise _bad(p, f"4-bit weight must be uint8 with {(numel + 1) // 2} bytes for shape [{n}, {k}], "
                      f"got {w.dtype} {_shape(w)}")
    nblocks = -(-numel // qs.blocksize)
    if qs.absmax.numel() != nblocks:
        raise _bad(p, f"absmax has {qs.absmax.numel()} entries, expected {nblocks} (blocksize {qs.blocksize})")
    if qs.code.numel() != 16:
        raise _bad(p, f"quant_map has {qs.code.numel()} entries, expected 16")
    if qs.nested:
        if qs.absmax.dtype != torch.uint8:
            raise _bad(p, f"double-quant absmax must be uint8, got {qs.absmax.dtype}")
        nb2 = -(-nblocks // qs.state2.blocksize)
        if qs.state2.absmax.numel() != nb2 or qs.state2.code.numel() != 256:
            raise _bad(p, "nested_absmax / nested_quant_map have the wrong number of entries")
    elif not qs.absmax.is_floating_point():
        raise _bad(p, f"absmax must be float, got {qs.absmax.dtype}")
    return NF4Linear(w.to(device).reshape(-1, 1), qs)


def load_embedding(
    get: Callable[[str], torch.Tensor],
    has: Callable[[str], bool],
    prefix: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Embedding at ``prefix``: q8 (``qweight`` + group or row ``scales``) -> QEmbedding, else
    nn.Embedding."""
    p = prefix
    if has(f"{p}.qweight"):
        m = _load_q8(p, get(f"{p}.qweight"), _need(get, has, f"{p}.scales", p), device)
        return QEmbedding(m.qweight, m.scales, dtype)
    w = _need(get, has, f"{p}.weight", p)
    if w.dim() != 2 or not w.is_floating_point():
        raise _bad(p, f"embedding has shape {_shape(w)} and dtype {w.dtype}, expected a 2-D float matrix")
    return nn.Embedding.from_pretrained(w.to(device=device, dtype=dtype), freeze=True)
