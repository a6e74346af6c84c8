"""Prefill attention over an int8 KV cache, one block of cached positions at a time.

A prompt chunk of T tokens arriving at position ``pos`` attends to the ``pos`` cached positions
(int8 values, one fp32 scale per head and position) and causally to itself. Dequantizing the whole
cache for one SDPA call needs ~4 bytes per cached value of temporaries (1.3 GB at a 32K context of
the 7B shape); here each block of positions is dequantized on its own, attended to, and the partial
results are merged through their log-sum-exp (as flash-decoding merges splits), so the temporaries
stay at one block.

    attention_over_int8_cache(q, k_q, k_s, v_q, v_s, pos, block=None) -> [1, H, T, hd]

q [1, H, T, hd] (the chunk's queries, at positions pos..pos+T-1); k_q, v_q int8 [KV, >= pos+T, hd] and
k_s, v_s fp32 [KV, >= pos+T]: the cache, the chunk's own keys/values already written (read back
quantized, exactly as the decode step reads them). GQA (H a multiple of KV) is supported.
On CUDA the blocks go through PyTorch's flash-attention op (which returns the log-sum-exp); elsewhere
through an explicit fp32 formulation (`attend_ref`), which is also the reference for the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attend", "attend_ref", "attention_over_int8_cache", "merge"]


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(o fp32 [B, H, T, hd], lse fp32 [B, H, T]) of softmax(q k^T / sqrt(hd)) v; k, v have H heads.
    causal: query i sees keys 0..i (T == S)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    s = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        t, n = s.shape[-2], s.shape[-1]
        keep = torch.ones(t, n, dtype=torch.bool, device=s.device).tril(n - t)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ vf, lse


def _flash_ok(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Like attend_ref, through flash attention on CUDA (o in q's dtype there)."""
    if _flash_ok(q):
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k.contiguous(), v.contiguous(), 0.0, causal)
        return out[0], out[1].float()
    return attend_ref(q, k, v, causal)


def merge(o: torch.Tensor, lse: torch.Tensor, ob: torch.Tensor, lseb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (fp32 result)."""
    m = torch.maximum(lse, lseb)
    w1 = torch.exp(lse - m)
    w2 = torch.exp(lseb - m)
    tot = w1 + w2
    o = (o.float() * w1.unsqueeze(-1) + ob.float() * w2.unsqueeze(-1)) / tot.unsqueeze(-1)
    return o, m + torch.log(tot)


def _expand(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _deq(x_q: torch.Tensor, x_s: torch.Tensor, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
    return (x_q[:, s:e].float() * x_s[:, s:e, None]).to(dtype).unsqueeze(0)


def attention_over_int8_cache(q: torch.Tensor, k_q: torch.Tensor, k_s: torch.Tensor, v_q: torch.Tensor,
                              v_s: torch.Tensor, pos: int, block: int | None = None) -> torch.Tensor:
    t = q.shape[2]
    rep = q.shape[1] // k_q.shape[0]
    kn, vn = _deq(k_q, k_s, pos, pos + t, q.dtype), _deq(v_q, v_s, pos, pos + t, q.dtype)
    o, lse = attend(q, _expand(kn, rep), _expand(vn, rep), causal=True)
    if block is None:  # keeps the fp32 score block of the CPU path near 128 MB for 30 heads x 1024 queries
        block = 4096 if q.is_cuda else 1024
    for s in range(0, pos, block):
        e = min(s + block, pos)
        kb, vb = _deq(k_q, k_s, s, e, q.dtype), _deq(v_q, v_s, s, e, q.dtype)
        ob, lseb = attend(q, _expand(kb, rep), _expand(vb, rep), causal=False)
        o, lse = merge(o, lse, ob, lseb)
    return o.to(q.dtype)


def _sdpa_reference(q, k_q, k_s, v_q, v_s, pos):
    """Plain SDPA over the whole dequantized cache up to pos+T (what the model did before)."""
    t = q.shape[2]
    k, v = _deq(k_q, k_s, 0, pos + t, q.dtype), _deq(v_q, v_s, 0, pos + t, q.dtype)
    kpos = torch.arange(pos + t, device=q.device)
    qpos = torch.arange(pos, pos + t, device=q.device)
    mask = kpos[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
