"""Gated delta rule over a whole prompt in one launch per layer (prefill on CUDA, no autograd).

    gdn_recurrent_prefill(q, k, v, a, b, A_log, dt_bias, beta_scale, state=None, n_valid=None)
        -> o [B, Hv, T, dv] fp32 (head-first, the layout of chunk_gated_delta_rule_heads' output);
           `state` (fp32 [B, Hv, dk, dv]) is updated in place when given. `n_valid` (a device int tensor of
           one element): only the first n_valid tokens update the state (padding after a prompt, as the
           captured prefill graphs run it); the outputs of the others are not meaningful.

q, k [B, Hk, T, dk] fp32 head-first (L2-normed, q scaled: gdn_prefill_prep's output, key heads NOT
repeated: value head h reads key head h // (Hv / Hk)); v [B, Hv, T, dv] fp32; a, b [B, T, Hv] the raw
gate projections (any float dtype, any strides with a unit last stride). The gates are computed here
as the model computes them (spec §5.4): g = -exp(A_log) * softplus(a + dt_bias), beta =
sigmoid(b) * beta_scale (2 when negative eigenvalues are allowed), all fp32.

Why: the chunked torch form launches ~50 small ops per GDN layer (more with the gate math and the
key-head repeat), which left a 512-token prefill CPU-launch-bound (~1,400 launches per forward). Here
each program owns one value head and a BV-column slice of its [dk, dv] state, keeps the slice in
registers for the whole prompt and walks the tokens in order: per token S <- exp(g) S, delta =
beta (v - S^T k), S <- S + k delta^T, o = S^T q, i.e. the recurrent reference step for step. The
state tile is stored transposed ([BV, BK], dk fastest) and a program is one warp, so both reductions
over dk are shuffles (7B: 16 columns per program, 360 programs). The next token's q, k, v and gates are loaded before the current token's math (software
pipelining by hand, one token ahead), so the loop is bound by its dependent arithmetic, not by
load latency.

The torch reference is the token-by-token recurrence of kernels.delta_rule with the same gate math.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, tl, triton, use_triton
from .delta_rule import gdn_gates, mask_gates, recurrent_gated_delta_rule
from .gdn_decode import rec_state_dk_major

__all__ = ["gdn_recurrent_prefill", "gdn_recurrent_prefill_ref", "gdn_recurrent_prefill_triton"]


def gdn_recurrent_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                              b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float,
                              state: torch.Tensor | None = None, n_valid: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """The recurrence token by token in torch (fp32)."""
    B, hk, T, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    rep = hv // hk
    g, beta = mask_gates(*gdn_gates(a, b, A_log, dt_bias, beta_scale), n_valid)
    S = state if state is not None else torch.zeros(B, hv, dk, dv, dtype=torch.float32, device=q.device)
    if S.dtype != torch.float32:
        raise ValueError("the recurrent state must be fp32")
    qh, kh = (x.float().repeat_interleave(rep, dim=1).transpose(1, 2) for x in (q, k))  # [B, T, Hv, dk]
    o = recurrent_gated_delta_rule(qh, kh, v.float().transpose(1, 2), g, beta, S)
    return o.transpose(1, 2).contiguous()


if HAS_TRITON:

    @triton.jit
    def _token_loads(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, t, T, DK, DV, i, j, mk, mv, sa_t, sb_t):
        """Token t's q, k [BK], v [BV] slice and raw gates a, b (t past the end reads the last token
        again: the loop never uses it)."""
        t = tl.minimum(t, T - 1)
        qt = tl.load(q_ptr + t * DK + i, mask=mk, other=0.0)
        kt = tl.load(k_ptr + t * DK + i, mask=mk, other=0.0)
        vt = tl.load(v_ptr + t * DV + j, mask=mv, other=0.0)
        at = tl.load(a_ptr + t * sa_t).to(tl.float32)
        bt = tl.load(b_ptr + t * sb_t).to(tl.float32)
        return qt, kt, vt, at, bt

    @triton.jit
    def _gdn_recurrent_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, o_ptr,
                              T, HV, REP, DK, DV,
                              sa_b, sa_t, sb_b, sb_t, beta_scale,
                              BK: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
                              stride_sk=0, stride_sv=1, n_ptr=None, HAS_N: tl.constexpr = False):
        pid_bh = tl.program_id(0)
        pid_v = tl.program_id(1)
        bi = (pid_bh // HV).to(tl.int64)  # int64 offsets: [B, H, T, d] tensors of long prompts
        h = pid_bh % HV
        hkey = h // REP
        HK = HV // REP
        i = tl.arange(0, BK)  # key dim (fastest in the transposed state tile)
        j = pid_v * BV + tl.arange(0, BV)  # value columns of this program
        mk = i < DK
        mv = j < DV
        # state slice S[i, j] held transposed as st[j, i]
        s_off = pid_bh.to(tl.int64) * DK * DV + i[None, :] * stride_sk + j[:, None] * stride_sv
        sm = mv[:, None] & mk[None, :]
        if HAS_STATE:
            st = tl.load(s_ptr + s_off, mask=sm, other=0.0)
        else:
            st = tl.zeros([BV, BK], dtype=tl.float32)
        neg_a = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        dtb = tl.load(dtb_ptr + h).to(tl.float32)
        qb = q_ptr + (bi * HK + hkey) * T * DK
        kb = k_ptr + (bi * HK + hkey) * T * DK
        vb = v_ptr + (bi * HV + h) * T * DV
        ab = a_ptr + bi * sa_b + h
        bb = b_ptr + bi * sb_b + h
        ob = o_ptr + (bi * HV + h) * T * DV + j
        qn, kn, vn, an, bn = _token_loads(qb, kb, vb, ab, bb, 0, T, DK, DV, i, j, mk, mv, sa_t, sb_t)
        n_live = T
        if HAS_N:  # tokens from n_live on are padding: no decay, no write
            n_live = tl.load(n_ptr).to(tl.int32)
        for t in range(T):
            qt, kt, vt, at, bt = qn, kn, vn, an, bn
            # the next token's operands go out before this token's dependent math
            qn, kn, vn, an, bn = _token_loads(qb, kb, vb, ab, bb, t + 1, T, DK, DV, i, j, mk, mv, sa_t, sb_t)
            x = at + dtb
            sp = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # softplus (torch's threshold)
            decay = tl.exp(neg_a * sp)
            beta = beta_scale / (1.0 + tl.exp(-bt))
            if HAS_N:
                decay = tl.where(t < n_live, decay, 1.0)
                beta = tl.where(t < n_live, beta, 0.0)
            st = st * decay
            mem = tl.sum(st * kt[None, :], axis=1)  # S^T k  [BV]
            delta = (vt - mem) * beta
            st = st + delta[:, None] * kt[None, :]
            ot = tl.sum(st * qt[None, :], axis=1)  # S^T q
            tl.store(ob + t * DV, ot, mask=mv)
        if HAS_STATE:
            tl.store(s_ptr + s_off, st, mask=sm)


def gdn_recurrent_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                 b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float,
                                 state: torch.Tensor | None = None, n_valid: torch.Tensor | None = None, *,
                                 block_v: int | None = None, num_warps: int = 1) -> torch.Tensor:
    B, hk, T, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, hv, T) or hv % hk:
        raise ValueError(f"gdn_recurrent_prefill shapes: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if a.shape != (B, T, hv) or b.shape != (B, T, hv) or a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"a, b must be [B, T, Hv] with a unit last stride, got {tuple(a.shape)}, {tuple(b.shape)}")
    if state is not None and (state.shape != (B, hv, dk, dv) or state.stride(0) != hv * dk * dv
                              or rec_state_dk_major(state, dk, dv) is None):
        raise ValueError("the recurrent state must be fp32 [B, Hv, dk, dv], contiguous or dk-major "
                         "(dk and dv swapped in memory)")
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    o = torch.empty(B, hv, T, dv, dtype=torch.float32, device=q.device)
    if T == 0:
        return o
    bk = next_pow2(dk)
    # one warp per program, 64 fp32 of state per lane: the reductions over dk are shuffles, no barriers
    # (sm_90 build: 182 registers, ~515 instructions per token; 4 warps x 64 columns needed 14 barriers)
    bv = block_v or min(next_pow2(dv), max(16, 2048 // bk))
    # a dk-major state (DecodeState on CUDA) runs through a contiguous copy: the kernel's per-token math takes
    # its layout from the state's load, and a dk-major load made each token ~1.5x longer (sm_90: 750 against
    # 515 instructions; H200 pp2048 -11 %); two copies of 2.2 MB per 7B layer cost a few microseconds
    work = state
    if state is not None and rec_state_dk_major(state, dk, dv):
        work = state.contiguous()
    s_arg = work if work is not None else o
    _gdn_recurrent_kernel[(B * hv, triton.cdiv(dv, bv))](
        q, k, v, a, b, A_log, dt_bias, s_arg, o,
        T, hv, hv // hk, dk, dv,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(beta_scale),
        BK=bk, BV=bv, HAS_STATE=state is not None, num_warps=num_warps,
        **({} if work is None else dict(stride_sk=work.stride(2), stride_sv=work.stride(3))),
        **({} if n_valid is None else dict(n_ptr=n_valid, HAS_N=True)),
    )
    if work is not state:
        state.copy_(work)
    return o


def gdn_recurrent_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          A_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float,
                          state: torch.Tensor | None = None, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        return gdn_recurrent_prefill_triton(q, k, v, a, b, A_log, dt_bias, beta_scale, state, n_valid)
    return gdn_recurrent_prefill_ref(q, k, v, a, b, A_log, dt_bias, beta_scale, state, n_valid)
