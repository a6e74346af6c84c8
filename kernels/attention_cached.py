"""Prefill attention over the KV cache with the position on the device (the prefill graphs' attention).

    attention_cached(q, k_cache, v_cache, pos, k_scale=None, v_scale=None) -> o [H, T, hd] in q's dtype

q [H, T, hd] (any strides, unit last stride): the chunk's queries at positions pos .. pos+T-1, pos an int
device tensor of one element (never read on the host: a CUDA graph holds the launch and serves every
position). k_cache, v_cache [KV, S, hd] (model dtype, or int8 codes with k_scale, v_scale fp32 [KV, S]), with
the chunk's own keys and values already written at pos .. pos+T-1; query i sees keys 0 .. pos+i (causal), and
H is a multiple of KV (GQA: query head h reads kv head h // (H / KV)). Padding after a prompt (the prefill
graphs run one length per bucket) only adds query rows, which no real row sees.

Triton: one program per (head, block of BM queries); it walks the key blocks up to its last query's position
with an online softmax (scores and p in fp32, the two matmuls on tensor cores in the model dtype, int8 keys
and values dequantized with their per-position scales first, fp32 models with IEEE fp32 dots), as flash
attention does. The torch reference dequantizes the cache up to pos+T and applies the causal mask.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, tl, triton, use_triton

__all__ = ["attention_cached", "attention_cached_ref", "attention_cached_triton"]


def _checks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape or q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"attention_cached: q {tuple(q.shape)} and caches {tuple(k_cache.shape)} do not fit")
    h, t, hd = q.shape
    if h % k_cache.shape[0]:
        raise ValueError(f"{h} query heads are not a multiple of {k_cache.shape[0]} kv heads")
    if (k_cache.dtype == torch.int8) != (k_scale is not None and v_scale is not None):
        raise ValueError("int8 caches need k_scale and v_scale (and only they do)")
    return h, t, hd


def attention_cached_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 softmax attention over keys 0 .. pos+i for query i (reads pos on the host)."""
    h, t, hd = _checks(q, k_cache, v_cache, k_scale, v_scale)
    p = int(pos.reshape(-1)[0])
    end = p + t
    k, v = k_cache[:, :end].float(), v_cache[:, :end].float()
    if k_scale is not None:
        k, v = k * k_scale[:, :end, None], v * v_scale[:, :end, None]
    rep = h // k_cache.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = (q.float() @ k.transpose(1, 2)) * hd ** -0.5
    keep = torch.arange(end, device=q.device)[None, :] <= (p + torch.arange(t, device=q.device))[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _kv_tile(c_ptr, s_ptr, kvh, s, d, sc_h, sc_s, ss_h, rm, dm, QUANT: tl.constexpr):
        """Rows s of one kv head's cache (rm: rows that exist), fp32, int8 codes times their scales."""
        x = tl.load(c_ptr + kvh * sc_h + s[:, None] * sc_s + d[None, :], mask=rm[:, None] & dm[None, :], other=0)
        if QUANT:
            sc = tl.load(s_ptr + kvh * ss_h + s, mask=rm, other=0.0)
            return x.to(tl.float32) * sc[:, None]
        return x.to(tl.float32)

    @triton.jit
    def _attn_cached_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, pos_ptr,
                            T, HD, sq_h, sq_t, sk_h, sk_s, sv_h, sv_s, sks_h, svs_h, so_h, so_t, scale,
                            G: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            QUANT: tl.constexpr, IEEE: tl.constexpr):
        h = tl.program_id(0)
        mb = tl.program_id(1)
        kvh = h // G
        pos = tl.load(pos_ptr).to(tl.int32)
        i = mb * BM + tl.arange(0, BM)
        d = tl.arange(0, BD)
        dm = d < HD
        qm = (i < T)[:, None] & dm[None, :]
        q = tl.load(q_ptr + h * sq_h + i[:, None] * sq_t + d[None, :], mask=qm, other=0)
        ty = q.dtype
        qpos = pos + i
        end = pos + tl.minimum((mb + 1) * BM, T)  # this block's last query sees keys < end
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        for s0 in range(0, end, BN):
            s = s0 + tl.arange(0, BN)
            rm = s < end
            k = _kv_tile(k_ptr, ks_ptr, kvh, s, d, sk_h, sk_s, sks_h, rm, dm, QUANT)
            v = _kv_tile(v_ptr, vs_ptr, kvh, s, d, sv_h, sv_s, svs_h, rm, dm, QUANT)
            if IEEE:
                sc = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k.to(ty)))
            sc = sc * scale
            sc = tl.where((s[None, :] <= qpos[:, None]) & rm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(ty), v.to(ty))
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(o_ptr + h * so_h + i[:, None] * so_t + d[None, :], o.to(o_ptr.dtype.element_ty), mask=qm)


def attention_cached_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                            block_m: int = 64, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    h, t, hd = _checks(q, k_cache, v_cache, k_scale, v_scale)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention_cached needs a unit last stride")
    out = torch.empty(h, t, hd, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    quant = k_cache.dtype == torch.int8
    ks = k_scale if quant else pos
    vs = v_scale if quant else pos
    bm = min(block_m, max(16, next_pow2(t)))
    _attn_cached_kernel[(h, cdiv(t, bm))](
        q, k_cache, v_cache, ks, vs, out, pos,
        t, hd, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        ks.stride(0) if quant else 0, vs.stride(0) if quant else 0, out.stride(0), out.stride(1),
        float(hd) ** -0.5,
        G=h // k_cache.shape[0], BD=max(16, next_pow2(hd)), BM=bm, BN=block_n, QUANT=quant,
        IEEE=q.dtype == torch.float32, num_warps=num_warps,
    )
    return out


def attention_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        return attention_cached_triton(q, k_cache, v_cache, pos, k_scale, v_scale)
    return attention_cached_ref(q, k_cache, v_cache, pos, k_scale, v_scale)
