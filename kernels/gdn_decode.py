"""Gated DeltaNet single-token decode step (spec §5.2-§5.6), fused into one kernel per layer.

    gdn_decode_step(qkv, z, a, b, conv_weight, conv_state, A_log, dt_bias, norm_weight, rec_state,
                    allow_neg_eigval=True, out=None) -> y [Hv*dv] (z.dtype)

Inputs (one token; each may be a slice of one projection output, any leading dims of size 1):
  qkv          [conv_dim]   pre-conv q|k|v, conv_dim = 2*Hk*dk + Hv*dv, heads contiguous per stream
  z            [Hv*dv]      output gate
  a, b         [Hv]         gate inputs (any float dtype)
  conv_weight  [conv_dim, K] (or [conv_dim, 1, K]); tap K-1 multiplies the current token
  conv_state   [conv_dim, K-1] model dtype, oldest first   -- updated in place (shift left, append)
  A_log, dt_bias [Hv]       (upcast to fp32 here)
  norm_weight  [dv]         gated RMSNorm weight shared by the heads (eps 1e-5)
  rec_state    [Hv, dk, dv] fp32                           -- updated in place
Hk is read off the shapes; value head h uses key head h // (Hv // Hk) (repeat_interleave).

Math: conv + SiLU; q, k L2-normed per head (eps 1e-6 on the sum), q *= dk**-0.5;
beta = sigmoid(b) (*2 if allow_neg_eigval); g = -exp(A_log) * softplus(a + dt_bias);
S = exp(g) S; m = S^T k; S += k (beta (v - m))^T; o = S^T q;
y = o * rsqrt(mean(o^2) + 1e-5) * w * silu(z).

Kernel: grid (Hv, dv blocks). Each program recomputes its head's q and k (a few hundred
channels), convolves its slice of v, and owns a [dk, BV] slice of the state: one load, update, one
store. The unnormalised o slice goes to an fp32 scratch. A per-key-head atomic counter picks the
last program of the key head's group; that program (after every other program has read its
inputs) writes the shifted q/k conv state and applies the gated RMSNorm over the full dv of each
of the group's value heads. The counter resets itself: one launch, CUDA-graph capturable.

folded=True (the q4 decode step): qkv is the conv's fp32 activations (the in-projection's conv epilogue did
the conv and its state update), and the result is (x~, hs): x~ = o * w * silu(z) without the rstd and hs
[Hv, dv blocks] with each program's sum of o^2, which the o projection turns into the heads' rstds
(kernels.gemv_q4 head_rstd). The programs then share nothing: no counter, no last-program tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, cdiv, next_pow2, tl, triton, pdl_kwargs, use_pdl, use_triton, workspace
from .delta_rule import gdn_gates

__all__ = ["gdn_decode_step", "gdn_decode_step_ref", "gdn_decode_step_triton", "rec_state_dk_major"]

L2_EPS = 1e-6
NORM_EPS = 1e-5
# the fused a|b projection loads a head's two W_ab rows whole, before waiting for the previous kernel,
# for hidden sizes up to this (beyond it, a loop over 512-wide chunks after the wait)
AB_ONCE_MAX_D = 8192
# state columns per program and warps of the Triton step (64 x 8: 7.6 us per 7B layer on an H100 against 8.3
# for 32 x 4 timed alone; in the step, fewer registers per program let the next GEMV's programs in sooner)
BLOCK_V = 64
NUM_WARPS = 8
# with a and b given (no fused a|b projection) and the state stored dk-major: one warp per 16 state columns,
# so the sums over dk are shuffles (H200, after the 7B in-projection: 6.2 us against 7.1 for 64 x 8 with the
# fused a|b; scripts/gpu_gdn_step_probe.py)
SMALL_BLOCK_V = 16
SMALL_WARPS = 1
# the state slice and the v conv state are stored after the per-key-head counter's atomic (which releases the
# program's earlier writes, so it waits for every store issued before it) instead of before it: only the o
# slice, which the last program reads, has to be visible by then
LATE_STORES = True


def rec_state_dk_major(s: torch.Tensor, dk: int, dv: int) -> bool | None:
    """Layout of a recurrent state [..., Hv, dk, dv] whose heads are packed blocks of dk * dv: False when
    contiguous, True when dk-major (the transpose of a contiguous [..., Hv, dv, dk]; DecodeState on CUDA),
    None for any other layout or dtype than fp32."""
    if s.dtype != torch.float32 or s.dim() < 3 or s.stride(-3) != dk * dv:
        return None
    inner = s.stride()[-2:]
    if inner == (dv, 1):
        return False
    return True if inner == (1, dk) else None


def _shapes(qkv, A_log, rec_state, conv_weight):
    hv, dk, dv = rec_state.shape
    conv_dim = qkv.numel()
    if A_log.numel() != hv:
        raise ValueError(f"A_log has {A_log.numel()} entries, rec_state has {hv} heads")
    rest = conv_dim - hv * dv
    if rest <= 0 or rest % (2 * dk):
        raise ValueError(f"conv_dim {conv_dim} does not split into q|k ({dk}-wide heads) and v ({hv}x{dv})")
    hk = rest // (2 * dk)
    if hv % hk:
        raise ValueError(f"value heads {hv} are not a multiple of key heads {hk}")
    kconv = conv_weight.numel() // conv_dim
    return hk, hv, dk, dv, conv_dim, kconv


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def gdn_decode_step_ref(
    qkv: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rec_state: torch.Tensor,
    allow_neg_eigval: bool = True,
    out: torch.Tensor | None = None,
    *,
    ab_from: tuple[torch.Tensor, torch.Tensor] | None = None,
    ab_rstd: tuple[torch.Tensor, float] | None = None,
    folded: bool = False,
):
    hk, hv, dk, dv, conv_dim, kconv = _shapes(qkv, A_log, rec_state, conv_weight)
    f32 = torch.float32
    if ab_from is not None:  # a|b = u @ W_ab.T computed here, in fp32 (the fused kernel does the same)
        u, w_ab = ab_from
        ab = w_ab.to(f32) @ u.reshape(-1).to(f32)
        if ab_rstd is not None:  # u is x~ of a folded norm (kernels.gemv_q4.q4_gemv_fold): scale by rstd
            ss, eps = ab_rstd
            ab = ab * torch.rsqrt(ss.to(f32).sum() / u.numel() + eps)
        a, b = ab.split([hv, hv])
    if folded:  # qkv holds the conv's activations already (kernels.gemv_q4's conv epilogue)
        y = qkv.reshape(conv_dim).to(f32)
    else:  # short causal conv over [old K-1 inputs, current], then SiLU
        x = qkv.reshape(conv_dim, 1).to(f32)
        win = torch.cat([conv_state.to(f32), x], dim=1)  # [conv_dim, K]
        y = F.silu((win * conv_weight.reshape(conv_dim, kconv).to(f32)).sum(dim=1))
        conv_state.copy_(win[:, 1:])
    q, k, v = torch.split(y, [hk * dk, hk * dk, hv * dv])
    q = q.view(hk, dk)
    k = k.view(hk, dk)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2_EPS) * dk**-0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2_EPS)
    if hv != hk:
        q = q.repeat_interleave(hv // hk, dim=0)
        k = k.repeat_interleave(hv // hk, dim=0)
    v = v.view(hv, dv)
    g, beta = gdn_gates(a.reshape(hv), b.reshape(hv), A_log.reshape(hv), dt_bias.reshape(hv),
                        2.0 if allow_neg_eigval else 1.0)
    # delta rule on the fp32 state, in place
    s = rec_state
    s.mul_(torch.exp(g)[:, None, None])
    mem = torch.einsum("hkv,hk->hv", s, k)
    s.add_(k[:, :, None] * (beta[:, None] * (v - mem))[:, None, :])
    o = torch.einsum("hkv,hk->hv", s, q)
    # gated RMSNorm per head (weight shared by heads), SiLU gate; folded: without the rstd, which the o
    # projection applies from the heads' sums of squares (kernels.gemv_q4 head_rstd)
    hs = o.pow(2).sum(-1, keepdim=True)
    if not folded:
        o = o * torch.rsqrt(hs / dv + NORM_EPS)
    o = o * norm_weight.to(f32) * F.silu(z.reshape(hv, dv).to(f32))
    o = o.reshape(hv * dv)
    if out is None:
        out = o.to(z.dtype)
    else:
        out.view(hv * dv).copy_(o)
    return (out, hs) if folded else out


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import fold_rstd, pdl_launch_dependents, pdl_wait

    @triton.jit
    def _conv_old(cs_ptr, ch, cmask, jj, KC: tl.constexpr):
        """The conv state's part of a channel window: [C, KP] old inputs in columns 0..K-2 and the
        next state's old part (shifted by one); written by no other kernel of the step, so it is
        loaded before waiting for the previous kernel."""
        old_mask = cmask[:, None] & (jj[None, :] < KC - 1)
        state = tl.load(cs_ptr + ch[:, None] * (KC - 1) + jj[None, :], mask=old_mask, other=0).to(tl.float32)
        nxt_mask = cmask[:, None] & (jj[None, :] + 1 < KC - 1)
        nxt = tl.load(cs_ptr + ch[:, None] * (KC - 1) + jj[None, :] + 1, mask=nxt_mask, other=0).to(tl.float32)
        return state, nxt

    @triton.jit
    def _conv_window(qkv_ptr, state, nxt, ch, cmask, jj, KC: tl.constexpr):
        """[C, KP] window (old K-1 inputs, then the current one) and the next state (window shifted by 1)."""
        cur = tl.load(qkv_ptr + ch, mask=cmask, other=0).to(tl.float32)
        win = tl.where(jj[None, :] == KC - 1, cur[:, None], state)
        nxt = tl.where(jj[None, :] == KC - 2, cur[:, None], nxt)
        return win, nxt

    @triton.jit
    def _conv_w(cw_ptr, ch, cmask, jj, KC: tl.constexpr):
        w = tl.load(cw_ptr + ch[:, None] * KC + jj[None, :], mask=cmask[:, None] & (jj[None, :] < KC), other=0)
        return w.to(tl.float32)

    @triton.jit
    def _conv_silu(w, win):
        acc = tl.sum(win * w, axis=1)
        return acc / (1.0 + tl.exp(-acc))

    @triton.jit
    def _store_conv_state(cs_ptr, nxt, ch, cmask, jj, KC: tl.constexpr):
        msk = cmask[:, None] & (jj[None, :] < KC - 1)
        tl.store(cs_ptr + ch[:, None] * (KC - 1) + jj[None, :], nxt.to(cs_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _gdn_decode_kernel(
        qkv_ptr, z_ptr, a_ptr, b_ptr, cw_ptr, cs_ptr, alog_ptr, dtb_ptr, nw_ptr,
        s_ptr, out_ptr, ows_ptr, cnt_ptr,
        HK, DK, DV, R, NVB,  # key heads, head dims, value heads per key head, dv blocks
        q_scale,
        KC: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
        NEG: tl.constexpr, USE_PDL: tl.constexpr,
        u_ptr=None, wab_ptr=None, D=0, FUSED_AB: tl.constexpr = False, BU: tl.constexpr = 512,
        AB_ONCE: tl.constexpr = False,
        rss_ptr=None, NSS=0, eps_r=0.0, AB_RSTD: tl.constexpr = False, NSSP: tl.constexpr = 1,
        stride_sk=0, stride_sv=1,  # the state's strides along dk and dv (a head's block is DK * DV)
        LATE_STORES: tl.constexpr = True,
        FOLDED: tl.constexpr = False, hs_ptr=None,  # act in, x~ and the norm's partial sums out (see the wrapper)
    ):
        pdl_launch_dependents(USE_PDL)
        h = tl.program_id(0)
        vb = tl.program_id(1)
        kh = h // R
        jj = tl.arange(0, KP)
        dk = tl.arange(0, BK)
        mk = dk < DK
        qch = kh * DK + dk
        kch = HK * DK + kh * DK + dk
        dvi = vb * BV + tl.arange(0, BV)
        mv = dvi < DV
        vch = 2 * HK * DK + h * DV + dvi
        # what no earlier kernel of this step writes (the recurrent and conv states, written by this
        # kernel one token ago, and the weights) is loaded before waiting for the previous kernel
        # (programmatic dependent launch): the state slice streams in during the in-projection's tail
        soff = h * DK * DV + dk[:, None] * stride_sk + dvi[None, :] * stride_sv
        smask = mk[:, None] & mv[None, :]
        st = tl.load(s_ptr + soff, mask=smask, other=0.0)
        if FOLDED:
            w_n = tl.load(nw_ptr + dvi, mask=mv, other=0).to(tl.float32)
        else:
            old_q, nxt_q = _conv_old(cs_ptr, qch, mk, jj, KC)
            old_k, nxt_k = _conv_old(cs_ptr, kch, mk, jj, KC)
            old_v, nxt_v = _conv_old(cs_ptr, vch, mv, jj, KC)
            w_q = _conv_w(cw_ptr, qch, mk, jj, KC)
            w_k = _conv_w(cw_ptr, kch, mk, jj, KC)
            w_v = _conv_w(cw_ptr, vch, mv, jj, KC)
        dt_b = tl.load(dtb_ptr + h).to(tl.float32)
        a_log = tl.load(alog_ptr + h).to(tl.float32)
        if AB_ONCE:  # the head's two W_ab rows whole (BU >= D), before the wait: after it only u is loaded
            du = tl.arange(0, BU)
            mu = du < D
            w_a = tl.load(wab_ptr + h * D + du, mask=mu, other=0)
            w_b = tl.load(wab_ptr + (HK * R + h) * D + du, mask=mu, other=0)
        pdl_wait(USE_PDL)
        if AB_RSTD:  # u is x~ of a folded norm: a|b scaled by rstd from the producer's row-block sums
            ab_scale = fold_rstd(rss_ptr, NSS, NSSP, D, eps_r)

        # q and k of this head: conv, SiLU, L2 norm (recomputed by every program of the group); FOLDED: the
        # in-projection's conv epilogue wrote them (and v) convolved and activated, in fp32
        if FOLDED:
            q = tl.load(qkv_ptr + qch, mask=mk, other=0)
            k = tl.load(qkv_ptr + kch, mask=mk, other=0)
            v = tl.load(qkv_ptr + vch, mask=mv, other=0)
        else:
            win_q, nxt_q = _conv_window(qkv_ptr, old_q, nxt_q, qch, mk, jj, KC)
            win_k, nxt_k = _conv_window(qkv_ptr, old_k, nxt_k, kch, mk, jj, KC)
            q = _conv_silu(w_q, win_q)
            k = _conv_silu(w_k, win_k)
            # this program's slice of v
            win_v, nxt_v = _conv_window(qkv_ptr, old_v, nxt_v, vch, mv, jj, KC)
            v = _conv_silu(w_v, win_v)
        q = q * (q_scale / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6))
        k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)

        # gates (fp32)
        if AB_ONCE:
            uu = tl.load(u_ptr + du, mask=mu, other=0).to(tl.float32)
            a_h = tl.sum(uu * w_a.to(tl.float32), axis=0)
            b_h = tl.sum(uu * w_b.to(tl.float32), axis=0)
        elif FUSED_AB:  # a_h, b_h = u . W_ab[h], u . W_ab[Hv + h] (fp32 sums; saves a GEMV launch)
            du = tl.arange(0, BU)
            sa = tl.zeros([BU], dtype=tl.float32)
            sb = tl.zeros([BU], dtype=tl.float32)
            for d0 in range(0, D, BU):
                mu = d0 + du < D
                uu = tl.load(u_ptr + d0 + du, mask=mu, other=0).to(tl.float32)
                sa += uu * tl.load(wab_ptr + h * D + d0 + du, mask=mu, other=0).to(tl.float32)
                sb += uu * tl.load(wab_ptr + (HK * R + h) * D + d0 + du, mask=mu, other=0).to(tl.float32)
            a_h = tl.sum(sa, axis=0)
            b_h = tl.sum(sb, axis=0)
        else:
            a_h = tl.load(a_ptr + h).to(tl.float32)
            b_h = tl.load(b_ptr + h).to(tl.float32)
        if AB_RSTD:
            a_h = a_h * ab_scale
            b_h = b_h * ab_scale
        x = a_h + dt_b
        sp = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
        alpha = tl.exp(-tl.exp(a_log) * sp)
        beta = 1.0 / (1.0 + tl.exp(-b_h))
        if NEG:
            beta = beta * 2.0

        # delta rule on the [dk, BV] slice of the state
        st = st * alpha
        mem = tl.sum(st * k[:, None], axis=0)
        delta = beta * (v - mem)
        st = st + k[:, None] * delta[None, :]
        o = tl.sum(st * q[:, None], axis=0)
        if FOLDED:  # x~ = o * w * silu(z) and this slice's sum of o^2; the o projection applies the rstd
            zz = tl.load(z_ptr + h * DV + dvi, mask=mv, other=0).to(tl.float32)
            tl.store(out_ptr + h * DV + dvi, (o * w_n * (zz / (1.0 + tl.exp(-zz)))).to(out_ptr.dtype.element_ty),
                     mask=mv)
            tl.store(hs_ptr + h * NVB + vb, tl.sum(tl.where(mv, o * o, 0.0), axis=0))
            tl.store(s_ptr + soff, st, mask=smask)
        else:
            if not LATE_STORES:
                tl.store(s_ptr + soff, st, mask=smask)
            tl.store(ows_ptr + h * DV + dvi, o, mask=mv)

            # every thread of this program has read its conv inputs: the v slice's state is ours alone
            tl.debug_barrier()
            if not LATE_STORES:
                _store_conv_state(cs_ptr, nxt_v, vch, mv, jj, KC)
            done = tl.atomic_add(cnt_ptr + kh, 1)
            if LATE_STORES:  # after the counter's release: it then waits for the o slice only, not these
                tl.store(s_ptr + soff, st, mask=smask)
                _store_conv_state(cs_ptr, nxt_v, vch, mv, jj, KC)
            if done == R * NVB - 1:
                # last program of the key-head group: all others have read the q/k conv state and
                # written their o slices
                _store_conv_state(cs_ptr, nxt_q, qch, mk, jj, KC)
                _store_conv_state(cs_ptr, nxt_k, kch, mk, jj, KC)
                d = tl.arange(0, BDV)
                md = d < DV
                w = tl.load(nw_ptr + d, mask=md, other=0).to(tl.float32)
                for r in range(R):
                    hh = kh * R + r
                    oo = tl.load(ows_ptr + hh * DV + d, mask=md, other=0.0, cache_modifier=".cg")
                    zz = tl.load(z_ptr + hh * DV + d, mask=md, other=0).to(tl.float32)
                    rstd = 1.0 / tl.sqrt(tl.sum(oo * oo, axis=0) / DV + 1e-5)
                    yy = oo * rstd * w * (zz / (1.0 + tl.exp(-zz)))
                    tl.store(out_ptr + hh * DV + d, yy.to(out_ptr.dtype.element_ty), mask=md)
                tl.atomic_xchg(cnt_ptr + kh, 0)


def gdn_decode_step_triton(
    qkv: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rec_state: torch.Tensor,
    allow_neg_eigval: bool = True,
    out: torch.Tensor | None = None,
    *,
    ab_from: tuple[torch.Tensor, torch.Tensor] | None = None,
    ab_rstd: tuple[torch.Tensor, float] | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    ab_once_max: int | None = None,
    folded: bool = False,
):
    """Triton version of gdn_decode_step_ref (block_v: state columns per program; num_warps: by default
    SMALL_BLOCK_V x SMALL_WARPS with a, b given and a dk-major state, else BLOCK_V x NUM_WARPS)."""
    hk, hv, dk, dv, conv_dim, kconv = _shapes(qkv, A_log, rec_state, conv_weight)
    if ab_from is not None:
        u, w_ab = ab_from
        u = u.reshape(-1)
        if tuple(w_ab.shape) != (2 * hv, u.numel()) or not (u.is_contiguous() and w_ab.is_contiguous()):
            raise ValueError(f"ab_from: u [D] and a contiguous W_ab [{2 * hv}, D] expected, got "
                             f"{tuple(u.shape)} and {tuple(w_ab.shape)}")
        a = b = u  # unused by the kernel
        fused = dict(u_ptr=u, wab_ptr=w_ab, D=u.numel(), FUSED_AB=True)
        if u.numel() <= (AB_ONCE_MAX_D if ab_once_max is None else ab_once_max):
            fused.update(BU=next_pow2(u.numel()), AB_ONCE=True)
        if ab_rstd is not None:
            ss, eps = ab_rstd
            fused.update(rss_ptr=ss, NSS=ss.numel(), eps_r=float(eps), AB_RSTD=True,
                         NSSP=max(2, next_pow2(ss.numel())))
    else:
        if ab_rstd is not None:
            raise ValueError("ab_rstd scales the fused a|b projection: give ab_from too")
        fused = {}
    dk_major = rec_state_dk_major(rec_state, dk, dv)
    if dk_major is None:
        raise ValueError("rec_state must be an fp32 [Hv, dk, dv] tensor, contiguous or with dk and dv swapped "
                         "in memory ([Hv, dv, dk] transposed)")
    if not conv_state.is_contiguous() or tuple(conv_state.shape) != (conv_dim, kconv - 1):
        raise ValueError(f"conv_state must be a contiguous [{conv_dim}, {kconv - 1}] tensor")
    if kconv < 2:
        raise ValueError("the conv kernel needs at least 2 taps")
    if out is None:
        out = torch.empty(hv * dv, dtype=z.dtype, device=z.device)
    elif not out.is_contiguous() or out.numel() != hv * dv:
        raise ValueError(f"out must be contiguous with {hv * dv} elements")
    small = ab_from is None and dk_major
    block_v = (SMALL_BLOCK_V if small else BLOCK_V) if block_v is None else block_v
    num_warps = (SMALL_WARPS if small else NUM_WARPS) if num_warps is None else num_warps
    bv = min(block_v, next_pow2(dv))
    nvb = cdiv(dv, bv)
    ows = workspace("gdn_o", (hv * dv,), torch.float32, z.device)
    cnt = workspace("gdn_cnt", (hk,), torch.int32, z.device)
    if folded:
        if qkv.dtype != torch.float32 or not qkv.is_contiguous():
            raise ValueError("folded: qkv must be the conv's contiguous fp32 activations")
        fused.update(FOLDED=True, hs_ptr=workspace("gdn_hs", (hv, nvb), torch.float32, z.device))
    pdl = use_pdl(z)
    _gdn_decode_kernel[(hv, nvb)](
        qkv.reshape(-1), z.reshape(-1), a.reshape(-1), b.reshape(-1), conv_weight.reshape(conv_dim, kconv),
        conv_state, A_log.reshape(-1), dt_bias.reshape(-1), norm_weight.reshape(-1),
        rec_state, out, ows, cnt,
        hk, dk, dv, hv // hk, nvb,
        float(dk) ** -0.5,
        KC=kconv, KP=next_pow2(kconv), BK=next_pow2(dk), BV=bv, BDV=next_pow2(dv),
        NEG=bool(allow_neg_eigval), USE_PDL=pdl, stride_sk=rec_state.stride(1), stride_sv=rec_state.stride(2),
        LATE_STORES=LATE_STORES, **fused,
        num_warps=num_warps, **pdl_kwargs(pdl),
    )
    return (out, fused["hs_ptr"]) if folded else out


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def gdn_decode_step(
    qkv: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rec_state: torch.Tensor,
    allow_neg_eigval: bool = True,
    out: torch.Tensor | None = None,
    *,
    ab_from: tuple[torch.Tensor, torch.Tensor] | None = None,
    ab_rstd: tuple[torch.Tensor, float] | None = None,
    folded: bool = False,
):
    """One decode step of a GDN layer. With ``ab_from=(u, W_ab)`` the a|b projection of the normed
    input u is computed inside the step (a and b are then ignored: pass None); with ``ab_rstd=(ss,
    eps)`` u is the x~ of a folded norm and a|b are scaled by rsqrt(sum(ss) / D + eps). ``folded``: qkv
    holds the conv's fp32 activations (kernels.gemv_q4's conv epilogue updated the conv state), and the
    result is (x~, hs): the gated norm without its rstd, x~ = o * w * silu(z), and hs [Hv, B] fp32 whose
    rows sum to each head's sum of o^2, for the o projection's head_rstd=(hs, 1e-5); the kernel then has
    no cross-program step (no counter, no last-program tail)."""
    fn = gdn_decode_step_triton if use_triton(rec_state) else gdn_decode_step_ref
    return fn(qkv, z, a, b, conv_weight, conv_state, A_log, dt_bias, norm_weight, rec_state,
              allow_neg_eigval, out, ab_from=ab_from, ab_rstd=ab_rstd, folded=folded)
