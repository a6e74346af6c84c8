"""Single-token attention over a KV cache (flash-decoding), bf16/fp32 or int8 caches.

    attention_decode(q, k_cache, v_cache, length=None, out=None, *, k_scale=None, v_scale=None, pos=None)
        -> [H, hd]
    quantize_kv_int8(k, *, out=None, pos=None) -> (q int8, scale fp32)

attention_decode: q [H, hd]; k_cache, v_cache [KVH, max_ctx, hd] (unit last stride); `length` an
int32 device tensor [1] = number of valid positions INCLUDING the current token (already written by
the caller), >= 1; or instead `pos` = length - 1, the decode state's position, which no kernel of the
step writes before this one: the kernel reads it before waiting for the previous kernel, so that
empty splits leave at once. GQA: query head h reads kv head h // (H // KVH). Scale hd**-0.5, fp32 softmax,
result in q.dtype. int8 caches: pass k_scale / v_scale [KVH, max_ctx] fp32 (k = q * scale per
head and position).

Kernel: grid (H, num_splits). The number of splits is fixed when the op is first called for a
max_ctx (capture-safe); the split length is computed in the kernel from `length`, so at any length
all splits share the work (empty splits return at once). A program streams [BS, hd] tiles of K and
V for its query head (with GQA the heads of one kv head re-read it, mostly from L2) and keeps the
online softmax per tile row ("lane"), so the loop has no cross-lane reductions besides q.k; lanes
are merged once at the end. Each split writes (max, sum, acc) to a workspace; the last split of a
head (self-resetting atomic counter) merges them and writes the output. One launch, no host sync.

attention_prep(qkv, q_w, k_w, eps_q, eps_k, k_cache, v_cache, pos, length, *, k_scale=None, v_scale=None)
    -> q [H, hd]: everything between the qkv projection and attention_decode for one token of a NoPE
    layer, in one launch: q and k RMS-normed over their full width (H*hd, KVH*hd; Olmo's q_norm /
    k_norm), k and v written at position pos of the caches (bf16, or int8 + scales as
    quantize_kv_int8 does), and length[0] = pos + 1 for attention_decode. qkv [1, (H + 2 KVH) hd].
    Kernel: one program per query head; each recomputes the q (and, for the first head of a kv group,
    the k) sum of squares over the full width from L2 (15 KB), so no second launch is needed.

quantize_kv_int8: symmetric per (head, position): scale = max|k| / 127, q = floor(k * 127/max|k| + 0.5)
clamped to [-127, 127] (0 where max|k| = 0). k [KVH, T, hd] (or [KVH, hd]). With out=(q_cache
[KVH, C, hd], scale_cache [KVH, C]) and pos (int32 device tensor [1]) the T rows are written at
positions pos .. pos+T-1 of the caches (capture-safe); without out, new tensors are returned.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, num_sms, tl, triton, pdl_kwargs, use_pdl, use_triton, workspace

__all__ = [
    "attention_prep",
    "attention_prep_ref",
    "attention_prep_triton",
    "attention_decode",
    "attention_decode_ref",
    "attention_decode_triton",
    "attention_decode_prep",
    "attention_decode_prep_ref",
    "attention_decode_prep_triton",
    "default_num_splits",
    "quantize_kv_int8",
    "quantize_kv_int8_ref",
    "quantize_kv_int8_triton",
]


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------
def _length_or_pos(length: torch.Tensor | None, pos: torch.Tensor | None) -> None:
    if (length is None) == (pos is None):
        raise ValueError("attention_decode takes the length or the position (length - 1), one of them")


def attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    _length_or_pos(length, pos)
    # a host read: fine on CPU, the reason CUDA uses the kernel
    n = int(length.reshape(-1)[0]) if length is not None else int(pos.reshape(-1)[0]) + 1
    kvh, _, hd = k_cache.shape
    h = q.shape[0]
    k = k_cache[:, :n].to(torch.float32)
    v = v_cache[:, :n].to(torch.float32)
    if k_scale is not None:
        k = k * k_scale[:, :n, None].to(torch.float32)
        v = v * v_scale[:, :n, None].to(torch.float32)
    qf = q.reshape(kvh, h // kvh, hd).to(torch.float32)
    scores = torch.matmul(qf, k.transpose(1, 2)) * hd**-0.5  # [KVH, G, n]
    o = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(h, hd)
    if out is None:
        return o.to(q.dtype)
    out.copy_(o)
    return out


def _quantize_rows(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kf = k.to(torch.float32)
    amax = kf.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(kf * inv.unsqueeze(-1) + 0.5).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


def quantize_kv_int8_ref(
    k: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantize_rows(k)
    if out is None:
        return q, s
    q_out, s_out = out
    q3 = q if k.dim() == 3 else q.unsqueeze(1)
    s2 = s if k.dim() == 3 else s.unsqueeze(1)
    t = q3.shape[1]
    idx = torch.arange(t, device=q.device)
    if pos is not None:
        idx = idx + pos.reshape(-1)[:1].to(device=q.device, dtype=torch.long)
    q_out.index_copy_(1, idx, q3)
    s_out.index_copy_(1, idx, s2.to(s_out.dtype))
    return q_out, s_out


def _prep_shapes(qkv, k_cache):
    kvh, _, hd = k_cache.shape
    n = qkv.numel() // hd - 2 * kvh
    if qkv.numel() % hd or n <= 0 or n % kvh:
        raise ValueError(f"qkv of {qkv.numel()} values does not fit caches {tuple(k_cache.shape)}")
    return n, kvh, hd


def attention_prep_ref(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, eps_q: float, eps_k: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, *,
                       k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused ops: RMSNorm of q and k (kernels.norm), cache writes, length = pos + 1."""
    from .norm import rmsnorm_ref

    h, kvh, hd = _prep_shapes(qkv, k_cache)
    q, k, v = qkv.reshape(-1).split([h * hd, kvh * hd, kvh * hd])
    q = rmsnorm_ref(q, q_w, eps_q).view(h, hd)
    k = rmsnorm_ref(k, k_w, eps_k).view(kvh, 1, hd)
    _write_kv_ref(k, v.view(kvh, 1, hd), k_cache, v_cache, pos, k_scale, v_scale)
    length.copy_(pos.reshape(-1)[:1] + 1)
    return q


def _write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """k, v [KVH, 1, hd] written at position pos of the caches (bf16 / fp32 as is, int8 with their scales)."""
    if k_cache.dtype == torch.int8:
        quantize_kv_int8_ref(k, out=(k_cache, k_scale), pos=pos)
        quantize_kv_int8_ref(v, out=(v_cache, v_scale), pos=pos)
    else:
        p = pos.reshape(-1)[:1].long()
        k_cache.index_copy_(1, p, k.to(k_cache.dtype))
        v_cache.index_copy_(1, p, v.to(v_cache.dtype))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait

    @triton.jit
    def _kv_to_f32(x, QUANT: tl.constexpr):
        if QUANT:  # int8 bits read as uint8 -> exact float via the 2**23 trick
            return ((x.to(tl.int32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return x.to(tl.float32)

    @triton.jit
    def _attn_load(k_ptr, v_ptr, ks_ptr, vs_ptr, kvh, s0, lim, d, dm, stride_kh, stride_kt, stride_vh, stride_vt,
                   stride_ksh, stride_vsh, BS: tl.constexpr, QUANT: tl.constexpr):
        """The [BS, BD] K and V tiles at positions s0.. (below lim; int8: with their scales)."""
        pos = s0 + tl.arange(0, BS)
        pm = pos < lim
        kvm = pm[:, None] & dm[None, :]
        kt = tl.load(k_ptr + kvh * stride_kh + pos[:, None] * stride_kt + d[None, :], mask=kvm, other=0)
        vt = tl.load(v_ptr + kvh * stride_vh + pos[:, None] * stride_vt + d[None, :], mask=kvm, other=0)
        ksv = 1.0
        vsv = 1.0
        if QUANT:
            ksv = tl.load(ks_ptr + kvh * stride_ksh + pos, mask=pm, other=0.0)
            vsv = tl.load(vs_ptr + kvh * stride_vsh + pos, mask=pm, other=0.0)
        return kt, vt, ksv, vsv, pm

    @triton.jit
    def _attn_tile(kt, vt, ksv, vsv, pm, q, m_l, l_l, acc, QUANT: tl.constexpr):
        """One tile into the per-lane online softmax (m_l, l_l, acc): no cross-lane work but q.k."""
        sc = tl.sum(_kv_to_f32(kt, QUANT) * q[None, :], axis=1)  # [BS]
        if QUANT:
            sc = sc * ksv
        m_new = tl.where(pm, tl.maximum(m_l, sc), m_l)
        alpha = tl.exp(m_l - m_new)
        p = tl.exp(tl.where(pm, sc - m_new, -1.0e30))  # 0 on masked positions
        l_l = l_l * alpha + p
        if QUANT:
            p = p * vsv
        acc = acc * alpha[:, None] + p[:, None] * _kv_to_f32(vt, QUANT)
        return m_new, l_l, acc

    @triton.jit
    def _attn_decode_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, out_ptr, mws_ptr, lws_ptr, aws_ptr, cnt_ptr,
        stride_qh, stride_kh, stride_kt, stride_vh, stride_vt, stride_ksh, stride_vsh, stride_oh,
        sm_scale, HD,
        G: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
        NS: tl.constexpr, NSP: tl.constexpr, QUANT: tl.constexpr, USE_PDL: tl.constexpr,
        pos_ptr=None, EARLY: tl.constexpr = False,
        PREP: tl.constexpr = False, qw_ptr=None, kw_ptr=None, ss_ptr=None, NSS=0, NSSP: tl.constexpr = 2,
        eps_q=0.0, eps_k=0.0, NQ=0, NK=0, kcw_ptr=None, vcw_ptr=None, KV_PRE: tl.constexpr = False,
    ):
        pdl_launch_dependents(USE_PDL)
        hq = tl.program_id(0)  # query head
        sp = tl.program_id(1)  # split
        kvh = hq // G
        if EARLY:  # length = pos + 1 from a position no kernel of the step writes: read before the wait
            n = tl.load(pos_ptr) + 1
        else:
            pdl_wait(USE_PDL)
            n = tl.load(len_ptr)
        ss = ((n + NS - 1) // NS + BS - 1) // BS * BS  # positions per split, a multiple of BS
        start = sp * ss
        # an empty split leaves at once; with EARLY before waiting for the previous kernel (measured on the
        # H200 after the 7B qkv GEMV: 0.2-0.5 us less per launch, scripts/gpu_attn_probe.py)
        if start < n:
            end = tl.minimum(start + ss, n)
            n_active = (n + ss - 1) // ss
            d = tl.arange(0, BD)
            dm = d < HD
            loop_end = end
            if PREP:  # position n - 1 is not in the cache yet: the split that holds it adds it from qkv below
                loop_end = tl.minimum(end, n - 1)
            # KV_PRE (with PREP and EARLY: no kernel of this step writes a cache row the loop reads): the first
            # tile and the q norm weight are loaded before waiting for the previous kernel (at short contexts
            # that tile is a split's whole work)
            PRE_TILE: tl.constexpr = KV_PRE and PREP and EARLY
            if PRE_TILE:
                kt0, vt0, ks0, vs0, pm0 = _attn_load(k_ptr, v_ptr, ks_ptr, vs_ptr, kvh, start, loop_end, d, dm,
                                                     stride_kh, stride_kt, stride_vh, stride_vt, stride_ksh,
                                                     stride_vsh, BS, QUANT)
            if PREP:
                wq = tl.load(qw_ptr + hq * HD + d, mask=dm, other=0).to(tl.float32)
            if EARLY:
                pdl_wait(USE_PDL)
            if PREP:  # q_ptr is the qkv row: q normed here (attention_prep's math, rstd from the row sums)
                bj = tl.arange(0, NSSP)  # the qkv projection's row blocks
                sq = tl.sum(tl.load(ss_ptr + 2 * bj, mask=bj < NSS, other=0.0), axis=0)
                qh = tl.load(q_ptr + hq * HD + d, mask=dm, other=0).to(tl.float32)
                q = (qh * (1.0 / tl.sqrt(sq / NQ + eps_q)) * wq).to(q_ptr.dtype.element_ty).to(tl.float32) * sm_scale
            else:
                q = tl.load(q_ptr + hq * stride_qh + d, mask=dm, other=0).to(tl.float32) * sm_scale
            # online softmax kept per lane (row of the [BS, BD] tile): no cross-lane work in the loop
            m_l = tl.full([BS], -1.0e30, dtype=tl.float32)
            l_l = tl.zeros([BS], dtype=tl.float32)
            acc = tl.zeros([BS, BD], dtype=tl.float32)
            first = start
            if PRE_TILE:
                m_l, l_l, acc = _attn_tile(kt0, vt0, ks0, vs0, pm0, q, m_l, l_l, acc, QUANT)
                first = start + BS
            for s0 in range(first, loop_end, BS):
                kt, vt, ksv, vsv, pm = _attn_load(k_ptr, v_ptr, ks_ptr, vs_ptr, kvh, s0, loop_end, d, dm, stride_kh,
                                                  stride_kt, stride_vh, stride_vt, stride_ksh, stride_vsh, BS, QUANT)
                m_l, l_l, acc = _attn_tile(kt, vt, ksv, vsv, pm, q, m_l, l_l, acc, QUANT)
            # merge the lanes: this split's (max, sum, unnormalised output)
            m_s = tl.max(m_l, axis=0)
            w = tl.exp(m_l - m_s)
            l_s = tl.sum(l_l * w, axis=0)
            o_s = tl.sum(acc * w[:, None], axis=0)  # [BD]
            if PREP:
                if end == n:  # this split holds position n - 1: its k (normed) and v from the qkv row
                    p = n - 1
                    sk = tl.sum(tl.load(ss_ptr + 2 * bj + 1, mask=bj < NSS, other=0.0), axis=0)
                    kh = tl.load(q_ptr + NQ + kvh * HD + d, mask=dm, other=0).to(tl.float32)
                    wk = tl.load(kw_ptr + kvh * HD + d, mask=dm, other=0).to(tl.float32)
                    kh = (kh * (1.0 / tl.sqrt(sk / NK + eps_k)) * wk).to(q_ptr.dtype.element_ty).to(tl.float32)
                    vh = tl.load(q_ptr + NQ + NK + kvh * HD + d, mask=dm, other=0).to(tl.float32)
                    # the rows as the caches hold them (what the loop would have read back at p)
                    k_p, k_sc = _kv_row_value(kh, kcw_ptr, QUANT)
                    v_p, v_sc = _kv_row_value(vh, vcw_ptr, QUANT)
                    if hq % G == 0:  # the first query head of a kv group writes the kv head's rows
                        _write_kv_row(k_p, k_sc, kcw_ptr + kvh * stride_kh + p * stride_kt, ks_ptr + kvh * stride_ksh,
                                      p, d, dm, QUANT)
                        _write_kv_row(v_p, v_sc, vcw_ptr + kvh * stride_vh + p * stride_vt, vs_ptr + kvh * stride_vsh,
                                      p, d, dm, QUANT)
                    sc_p = tl.sum(k_p * q, axis=0) * k_sc
                    m_new = tl.maximum(m_s, sc_p)
                    a_old = tl.exp(m_s - m_new)
                    e_p = tl.exp(sc_p - m_new)
                    l_s = l_s * a_old + e_p
                    o_s = o_s * a_old + (e_p * v_sc) * v_p
                    m_s = m_new
            tl.store(mws_ptr + hq * NS + sp, m_s)
            tl.store(lws_ptr + hq * NS + sp, l_s)
            tl.store(aws_ptr + (hq * NS + sp) * HD + d, o_s, mask=dm)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + hq, 1)  # acq_rel, gpu scope
            if done == n_active - 1:  # the last split of this head merges all splits
                sj = tl.arange(0, NSP)
                sm = sj < n_active
                mm = tl.load(mws_ptr + hq * NS + sj, mask=sm, other=-1.0e30, cache_modifier=".cg")
                mx = tl.max(mm, axis=0)
                ww = tl.where(sm, tl.exp(mm - mx), 0.0)
                ll = tl.load(lws_ptr + hq * NS + sj, mask=sm, other=0.0, cache_modifier=".cg")
                aa = tl.load(aws_ptr + (hq * NS + sj[:, None]) * HD + d[None, :], mask=sm[:, None] & dm[None, :],
                             other=0.0, cache_modifier=".cg")
                o = tl.sum(aa * ww[:, None], axis=0) / tl.sum(ll * ww, axis=0)
                tl.store(out_ptr + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=dm)
                tl.atomic_xchg(cnt_ptr + hq, 0)

    @triton.jit
    def _store_kv_row(x, c_ptr, s_ptr, p, d, dm, QUANT: tl.constexpr):
        """One head's row at position p of a cache (c_ptr/s_ptr already at the head): bf16 as is, or
        int8 with its scale (quantize_kv_int8's rounding)."""
        v, sc = _kv_row_value(x, c_ptr, QUANT)
        _write_kv_row(v, sc, c_ptr, s_ptr, p, d, dm, QUANT)

    @triton.jit
    def _write_kv_row(v, sc, c_ptr, s_ptr, p, d, dm, QUANT: tl.constexpr):
        """The (values, scale) of _kv_row_value stored at position p (c_ptr / s_ptr already at the head)."""
        tl.store(c_ptr + d, v.to(c_ptr.dtype.element_ty), mask=dm)
        if QUANT:
            tl.store(s_ptr + p, sc)

    @triton.jit
    def _kv_row_value(x, c_ptr, QUANT: tl.constexpr):
        """(values, scale) of one head's row as the cache holds it and the decode loop reads it back: bf16 /
        fp32 rounded to the cache dtype (scale 1), or int8 codes (as floats) with their per-row scale."""
        if QUANT:
            amax = tl.max(tl.abs(x), axis=0)
            inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
            return tl.minimum(tl.maximum(tl.floor(x * inv + 0.5), -127.0), 127.0), amax / 127.0
        return x.to(c_ptr.dtype.element_ty).to(tl.float32), 1.0

    @triton.jit
    def _quantize_kv_kernel(k_ptr, q_ptr, s_ptr, pos_ptr, T, HD, stride_kh, stride_kt,
                            stride_qh, stride_qt, stride_sh, BD: tl.constexpr, HAS_POS: tl.constexpr,
                            USE_PDL: tl.constexpr):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        r = tl.program_id(0)
        h = r // T
        t = r % T
        if HAS_POS:
            p = tl.load(pos_ptr) + t
        else:
            p = t
        d = tl.arange(0, BD)
        dm = d < HD
        x = tl.load(k_ptr + h * stride_kh + t * stride_kt + d, mask=dm, other=0).to(tl.float32)
        _store_kv_row(x, q_ptr + h * stride_qh + p * stride_qt, s_ptr + h * stride_sh, p, d, dm, True)

    @triton.jit
    def _attn_prep_kernel(qkv_ptr, qw_ptr, kw_ptr, qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, pos_ptr, len_ptr,
                          eps_q, eps_k, NQ, NK, HD, stride_kh, stride_kt, stride_vh, stride_vt, stride_ksh,
                          stride_vsh, G: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          QUANT: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        h = tl.program_id(0)
        d = tl.arange(0, BD)
        dm = d < HD
        iq = tl.arange(0, BQ)
        qa = tl.load(qkv_ptr + iq, mask=iq < NQ, other=0).to(tl.float32)
        rq = 1.0 / tl.sqrt(tl.sum(qa * qa, axis=0) / NQ + eps_q)
        qh = tl.load(qkv_ptr + h * HD + d, mask=dm, other=0).to(tl.float32)
        wq = tl.load(qw_ptr + h * HD + d, mask=dm, other=0).to(tl.float32)
        out_ty = qo_ptr.dtype.element_ty
        tl.store(qo_ptr + h * HD + d, (qh * rq * wq).to(out_ty), mask=dm)
        p = tl.load(pos_ptr)
        if h % G == 0:  # the first query head of a kv group writes that kv head
            j = h // G
            ik = tl.arange(0, BK)
            ka = tl.load(qkv_ptr + NQ + ik, mask=ik < NK, other=0).to(tl.float32)
            rk = 1.0 / tl.sqrt(tl.sum(ka * ka, axis=0) / NK + eps_k)
            kh = tl.load(qkv_ptr + NQ + j * HD + d, mask=dm, other=0).to(tl.float32)
            wk = tl.load(kw_ptr + j * HD + d, mask=dm, other=0).to(tl.float32)
            kh = (kh * rk * wk).to(out_ty).to(tl.float32)  # the normed k in the model dtype, as unfused
            vh = tl.load(qkv_ptr + NQ + NK + j * HD + d, mask=dm, other=0).to(tl.float32)
            _store_kv_row(kh, kc_ptr + j * stride_kh + p * stride_kt, ks_ptr + j * stride_ksh, p, d, dm, QUANT)
            _store_kv_row(vh, vc_ptr + j * stride_vh + p * stride_vt, vs_ptr + j * stride_vsh, p, d, dm, QUANT)
        if h == 0:
            tl.store(len_ptr, p + 1)


def attention_prep_triton(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, eps_q: float, eps_k: float,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, *,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of attention_prep_ref (one launch)."""
    h, kvh, hd = _prep_shapes(qkv, k_cache)
    qkv = qkv.reshape(-1)
    if qkv.stride(0) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention_prep needs a contiguous qkv row and caches with a unit last stride")
    quant = k_cache.dtype == torch.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("int8 caches need k_scale and v_scale")
    ks = k_scale if quant else length  # unused when not quantized
    vs = v_scale if quant else length
    out = torch.empty((h, hd), dtype=qkv.dtype, device=qkv.device) if out is None else out
    pdl = use_pdl(qkv)
    _attn_prep_kernel[(h,)](
        qkv, q_w, k_w, out, k_cache, v_cache, ks, vs, pos, length, float(eps_q), float(eps_k), h * hd, kvh * hd,
        hd, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        ks.stride(0) if quant else 0, vs.stride(0) if quant else 0,
        G=h // kvh, BQ=next_pow2(h * hd), BK=next_pow2(kvh * hd), BD=next_pow2(hd), QUANT=quant, USE_PDL=pdl,
        num_warps=PREP_WARPS, **pdl_kwargs(pdl),
    )
    return out


# warps per program below 16K positions of cache (8 above): on the H200 after the 7B qkv GEMV, 4 warps
# took 9.0 / 10.6 / 26.6 us at lengths 128 / 640 / 4000 of a 4K cache against 11.7 / 12.6 / 30.3 with 8,
# but at length 32768 of a 33K cache 180 against 132 us (scripts/gpu_attn_probe.py); in the decode step
# 2 warps gave tg128 +0.8 % over 4 (session 9), 1 warp +0.2 %
SHORT_CTX_WARPS = 2
# programs per SM that the split count aims at below LONG_CTX_LAUNCH positions of cache (8 above)
SHORT_CTX_PER_SM = 4
# positions per K/V tile below LONG_CTX_LAUNCH positions of cache (32 above)
SHORT_CTX_BLOCK = 32
# warps per attention_prep program (one per query head; each sums q's whole row of squares)
PREP_WARPS = 4
# attention_decode_prep: each program loads its first K/V tile (and q's norm weight) before waiting for the
# qkv projection (no kernel of the step writes a cache row its loop reads; position pos comes from qkv)
KV_BEFORE_WAIT = True
# the launch is tuned for the cache size (or a ctx_hint): from this many positions on, 8 warps and ~8
# programs per SM; below, SHORT_CTX_WARPS and ~4 per SM
LONG_CTX_LAUNCH = 16384
# register cap (ptxas maxnreg) for the long-context launch with the prep inside (None: ptxas's choice); the
# sm_90 AOT build has 64 registers without the prep, 69-75 with it, i.e. 3 instead of 4 programs per SM
LONG_CTX_PREP_MAXNREG: int | None = None


def default_num_splits(max_ctx: int, num_heads: int, device: torch.device, block_s: int = 32) -> int:
    """Splits per query head, fixed by the context size (the split length follows the actual length):
    ~8 programs per SM for contexts of 16K and more, ~4 below, never more than blocks of work. H200
    sweep (30 heads x 128): at L=32768, 36 splits of 32-position blocks took 131 us (bf16) / 109 us
    (int8) vs 152 / 116 us at 18 x 64; at L=4096, 18 x 32 took 26.7 us vs 29.6 at 18 x 64."""
    per_sm = 8 if max_ctx >= LONG_CTX_LAUNCH else SHORT_CTX_PER_SM
    return max(1, min(cdiv(max_ctx, block_s), cdiv(per_sm * num_sms(device), num_heads), 64))


def attention_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    pos: torch.Tensor | None = None,
    ctx_hint: int | None = None,
    prep: tuple | None = None,
) -> torch.Tensor:
    """Triton version of attention_decode_ref (num_splits / block_s for tests and tuning). ``ctx_hint``:
    the context size to tune the launch for instead of the cache's (split count, warps; any length
    stays correct): a decode graph for short contexts in a long cache passes LONG_CTX_LAUNCH - 1. ``prep``:
    see attention_decode_prep_triton (needs ``pos``)."""
    _length_or_pos(length, pos)
    if prep is not None and pos is None:
        raise ValueError("attention_decode with prep takes the position")
    if length is None:
        length = pos  # the kernel reads pos (EARLY); len_ptr is not read
    kvh, max_ctx, hd = k_cache.shape
    h = q.shape[0]
    if q.dim() != 2 or q.shape[1] != hd or h % kvh:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches need a unit last stride")
    quant = k_cache.dtype == torch.int8
    if quant:
        if k_scale is None or v_scale is None:
            raise ValueError("int8 caches need k_scale and v_scale")
        kc, vc = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        ks, vs = k_scale, v_scale
    else:
        kc, vc = k_cache, v_cache
        ks = vs = length  # unused
    if out is None:
        out = torch.empty((h, hd), dtype=q.dtype, device=q.device)
    tune_ctx = min(max_ctx, ctx_hint) if ctx_hint else max_ctx
    block_s = block_s or (SHORT_CTX_BLOCK if tune_ctx < LONG_CTX_LAUNCH else 32)
    ns = num_splits or default_num_splits(tune_ctx, h, q.device, block_s)
    num_warps = num_warps or (SHORT_CTX_WARPS if tune_ctx < LONG_CTX_LAUNCH else 8)
    g = h // kvh
    mws = workspace("attn_m", (h, ns), torch.float32, q.device)
    lws = workspace("attn_l", (h, ns), torch.float32, q.device)
    aws = workspace("attn_acc", (h, ns, hd), torch.float32, q.device)
    cnt = workspace("attn_cnt", (h,), torch.int32, q.device)
    pdl = use_pdl(q)
    extra = {}
    if prep is not None:  # q is the qkv row (see attention_decode_prep)
        qkv, ss, q_w, k_w, eps_q, eps_k = prep
        extra = dict(PREP=True, KV_PRE=KV_BEFORE_WAIT, qw_ptr=q_w, kw_ptr=k_w, ss_ptr=ss, NSS=ss.shape[0],
                     NSSP=max(2, next_pow2(ss.shape[0])),
                     eps_q=float(eps_q), eps_k=float(eps_k), NQ=h * hd, NK=kvh * hd, kcw_ptr=k_cache, vcw_ptr=v_cache)
        q = qkv
        if LONG_CTX_PREP_MAXNREG and tune_ctx >= LONG_CTX_LAUNCH:
            extra["maxnreg"] = LONG_CTX_PREP_MAXNREG
    _attn_decode_kernel[(h, ns)](
        q, kc, vc, ks, vs, length, out, mws, lws, aws, cnt,
        q.stride(0), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        ks.stride(0) if quant else 0, vs.stride(0) if quant else 0, out.stride(0),
        float(hd) ** -0.5, hd,
        G=g, BD=next_pow2(hd), BS=block_s, NS=ns, NSP=next_pow2(ns), QUANT=quant, USE_PDL=pdl,
        pos_ptr=pos, EARLY=pos is not None,
        num_warps=num_warps, num_stages=num_stages, **extra, **pdl_kwargs(pdl),
    )
    return out


def _prep_checks(qkv: torch.Tensor, ss: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, k_cache: torch.Tensor
                 ) -> tuple[int, int, int]:
    h, kvh, hd = _prep_shapes(qkv, k_cache)
    if (qkv.stride(-1) != 1 or not qkv.is_contiguous() or ss.dim() != 2 or ss.shape[1] != 2
            or ss.dtype != torch.float32 or not ss.is_contiguous() or q_w.numel() != h * hd or k_w.numel() != kvh * hd):
        raise ValueError("attention_decode_prep: a contiguous qkv row, fp32 row sums [B, 2] and norm weights of "
                         "q's and k's widths")
    return h, kvh, hd


def attention_decode_prep_ref(qkv: torch.Tensor, ss: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor,
                              eps_q: float, eps_k: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              pos: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """attention_prep followed by attention_decode, with the q and k RMSNorms' sums of squares given (ss
    [B, 2]: column 0 sums to q's, column 1 to k's; q4_gemv's row_sums): q and k normed, k and v written at
    position pos of the caches, then attention over positions 0..pos."""
    h, kvh, hd = _prep_checks(qkv, ss, q_w, k_w, k_cache)
    q, k, v = qkv.reshape(-1).split([h * hd, kvh * hd, kvh * hd])
    tot = ss.sum(0)
    rq = torch.rsqrt(tot[0] / (h * hd) + eps_q)
    rk = torch.rsqrt(tot[1] / (kvh * hd) + eps_k)
    qn = (q.float() * rq * q_w.float()).to(qkv.dtype).view(h, hd)
    kn = (k.float() * rk * k_w.float()).to(qkv.dtype).view(kvh, 1, hd)
    _write_kv_ref(kn, v.view(kvh, 1, hd), k_cache, v_cache, pos, k_scale, v_scale)
    return attention_decode_ref(qn, k_cache, v_cache, k_scale=k_scale, v_scale=v_scale, pos=pos)


def attention_decode_prep_triton(qkv: torch.Tensor, ss: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor,
                                 eps_q: float, eps_k: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 pos: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                                 v_scale: torch.Tensor | None = None, **tune) -> torch.Tensor:
    """Triton version of attention_decode_prep_ref: attention_decode's kernel normalises q itself and the
    split that holds position pos takes that position's k and v from qkv (and writes them to the caches), so
    no attention_prep launch runs between the qkv projection and attention (``tune``: num_splits, block_s,
    num_warps, ctx_hint as attention_decode_triton)."""
    h, kvh, hd = _prep_checks(qkv, ss, q_w, k_w, k_cache)
    qkv = qkv.reshape(-1)
    dummy_q = qkv[: h * hd].view(h, hd)  # shape checks only: the kernel reads qkv
    return attention_decode_triton(dummy_q, k_cache, v_cache, k_scale=k_scale, v_scale=v_scale, pos=pos,
                                   prep=(qkv, ss, q_w, k_w, eps_q, eps_k), **tune)


def attention_decode_prep(qkv: torch.Tensor, ss: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, eps_q: float,
                          eps_k: float, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                          ctx_hint: int | None = None) -> torch.Tensor:
    if use_triton(qkv):
        return attention_decode_prep_triton(qkv, ss, q_w, k_w, eps_q, eps_k, k_cache, v_cache, pos, k_scale=k_scale,
                                            v_scale=v_scale, ctx_hint=ctx_hint)
    return attention_decode_prep_ref(qkv, ss, q_w, k_w, eps_q, eps_k, k_cache, v_cache, pos, k_scale=k_scale,
                                     v_scale=v_scale)


def quantize_kv_int8_triton(
    k: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_kv_int8_ref."""
    k3 = k if k.dim() == 3 else k.unsqueeze(1)
    kvh, t, hd = k3.shape
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    if out is None:
        q_out = torch.empty(k3.shape, dtype=torch.int8, device=k.device)
        s_out = torch.empty((kvh, t), dtype=torch.float32, device=k.device)
        result = (q_out, s_out) if k.dim() == 3 else (q_out.squeeze(1), s_out.squeeze(1))
    else:
        q_out, s_out = out
        result = out
    if q_out.stride(-1) != 1 or s_out.stride(-1) != 1 or s_out.dtype != torch.float32:
        raise ValueError("quantize_kv_int8: outputs need a unit last stride and fp32 scales")
    pdl = t == 1 and use_pdl(k3)  # decode: one block per head
    _quantize_kv_kernel[(kvh * t,)](
        k3, q_out, s_out, pos if pos is not None else s_out, t, hd,
        k3.stride(0), k3.stride(1), q_out.stride(0), q_out.stride(1), s_out.stride(0),
        BD=next_pow2(hd), HAS_POS=pos is not None, USE_PDL=pdl, num_warps=1, **pdl_kwargs(pdl),
    )
    return result


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    ctx_hint: int | None = None,
) -> torch.Tensor:
    if use_triton(q):
        return attention_decode_triton(q, k_cache, v_cache, length, out, k_scale=k_scale, v_scale=v_scale, pos=pos,
                                       ctx_hint=ctx_hint)
    return attention_decode_ref(q, k_cache, v_cache, length, out, k_scale=k_scale, v_scale=v_scale, pos=pos)


def quantize_kv_int8(
    k: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = quantize_kv_int8_triton if use_triton(k) else quantize_kv_int8_ref
    return fn(k, out=out, pos=pos)


def attention_prep(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, eps_q: float, eps_k: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, *,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    fn = attention_prep_triton if use_triton(qkv) else attention_prep_ref
    return fn(qkv, q_w, k_w, eps_q, eps_k, k_cache, v_cache, pos, length, k_scale=k_scale, v_scale=v_scale)
