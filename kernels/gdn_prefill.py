"""Gated DeltaNet prefill: the elementwise work around the chunked delta rule (spec §5.2-§5.6).

    gdn_prefill_prep(qkv, conv_weight, conv_state, hk, hv, dk, dv, q_scale)
        -> q, k [B, hk, T, dk], v [B, hv, T, dv] (fp32, contiguous, head-first), new conv state
    gated_rms_norm(o, z, w, eps) -> y [..., dv] in z.dtype

gdn_prefill_prep: causal depthwise conv + SiLU over the fused pre-conv q|k|v stream qkv [B, T,
conv_dim] (any strides, unit last stride; model dtype), rounded to qkv.dtype as the model does,
then q and k L2-normed per head (eps 1e-6 inside rsqrt of the sum; q also times q_scale), all
written head-first in fp32 -- the layout the delta rule's batched matmuls read. conv_state
[B, conv_dim, K-1] (oldest first) or None for zeros; the new state is the last K-1 pre-conv inputs,
in qkv.dtype. No repeat of key heads (the caller repeats them for hv > hk).
gated_rms_norm: o, z [..., dv] of one shape, any strides (o is usually a transposed view of the
delta rule's head-first output); y = o * rsqrt(mean(o^2) + eps) * w * silu(z), fp32 math; the
result is contiguous.

The torch references (`_ref`) are the model's CPU path (autograd-safe); the Triton kernels run on
CUDA for inference (no autograd). Kernels: prep, one launch per stream (q, k, v): a program owns BT
tokens x one head, reads its K taps (rows before the prompt come from the conv state; overlapping
taps hit L1/L2, HBM sees each input byte about once), writes fp32 rows of its head. Gated norm:
a program owns BT tokens x one head; reads o (fp32) and z, writes y. Bytes per token and layer
(7B: conv_dim 11520, Hv*dv 5760): prep 2 + 4 B per channel, norm 4 + 2 + 2 B per channel, against
~80 B and ~60 B per channel in the torch reference's separate passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, cdiv, next_pow2, tl, triton, use_triton

__all__ = [
    "conv_state_at",
    "gated_rms_norm",
    "gated_rms_norm_ref",
    "gated_rms_norm_triton",
    "gdn_prefill_prep",
    "gdn_prefill_prep_ref",
    "gdn_prefill_prep_triton",
    "l2_norm",
]

L2_EPS = 1e-6


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _needs_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------
def l2_norm(x: torch.Tensor, eps: float = L2_EPS, scale: float = 1.0) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim, times ``scale`` (folded into the per-row factor)."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    return x * (r * scale if scale != 1.0 else r)


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous tensor of ``dtype`` in one pass (x.to() keeps a dense input's strides)."""
    if x.dtype == dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _heads(x: torch.Tensor, n_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H*d] (any strides) -> contiguous head-first [B, H, T, d] in ``dtype``: one copy."""
    B, T, _ = x.shape
    return _contiguous(x.reshape(B, T, n_heads, head_dim).transpose(1, 2), dtype)


def gdn_prefill_prep_ref(qkv: torch.Tensor, conv_weight: torch.Tensor, conv_state: torch.Tensor | None,
                         hk: int, hv: int, dk: int, dv: int, q_scale: float):
    from .short_conv import causal_conv1d_silu

    K = conv_weight.shape[-1]
    y, new_state = causal_conv1d_silu(qkv, conv_weight.reshape(-1, K), conv_state)
    q, k, v = y.split([hk * dk, hk * dk, hv * dv], dim=-1)
    cd = _compute_dtype(qkv)
    q = l2_norm(_heads(q, hk, dk, cd), scale=q_scale)
    k = l2_norm(_heads(k, hk, dk, cd))
    return q, k, _heads(v, hv, dv, cd), new_state


def gated_rms_norm_ref(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head norm-then-gate (spec §5.6); the result is laid out like z.to() gives it (contiguous for
    a strided z), whatever o's strides are."""
    cd = _compute_dtype(o)
    of = o.to(cd)
    r = torch.rsqrt(of.square().mean(-1, keepdim=True) + eps)
    y = F.silu(_contiguous(z, cd)) * of  # the contiguous operand first: the output follows its layout
    return (y * r * w.to(cd)).to(z.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _conv_heads_kernel(x_ptr, st_ptr, w_ptr, out_ptr, T, C0, NH,
                           stride_xb, stride_xt, stride_sb, stride_sc, stride_sk, stride_wc,
                           eps, scale,
                           D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr,
                           NORM: tl.constexpr, HAS_STATE: tl.constexpr):
        """Tokens pid_t*BT.. of head h of one stream (channels C0 + h*D ..): conv, SiLU, rounding to
        x's dtype, optional L2 norm * scale; fp32 rows to out[b, h, t, :]."""
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        t = pid_t * BT + tl.arange(0, BT)
        tmask = t < T
        d = tl.arange(0, BD)
        dmask = d < D
        c = C0 + h * D + d
        xb = x_ptr + b.to(tl.int64) * stride_xb
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(KC):
            row = t - (KC - 1) + j  # input row of tap j; < 0: from the conv state
            wj = tl.load(w_ptr + c * stride_wc + j, mask=dmask, other=0).to(tl.float32)
            m = (tmask & (row >= 0))[:, None] & dmask[None, :]
            xv = tl.load(xb + row[:, None].to(tl.int64) * stride_xt + c[None, :], mask=m, other=0)
            xv = xv.to(tl.float32)
            if HAS_STATE:
                if j < KC - 1:  # only the first K-1 taps can reach back before the prompt
                    ms = (tmask & (row < 0))[:, None] & dmask[None, :]
                    sp = st_ptr + b * stride_sb + c[None, :] * stride_sc + (row + KC - 1)[:, None] * stride_sk
                    xv = xv + tl.load(sp, mask=ms, other=0).to(tl.float32)
            acc += xv * wj[None, :]
        y = acc / (1.0 + tl.exp(-acc))
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the conv output is rounded to the model dtype
        if NORM:
            r = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) + eps)
            y = y * (r * scale)[:, None]
        dst = out_ptr + ((b * NH + h).to(tl.int64) * T + t[:, None]) * D + d[None, :]
        tl.store(dst, y, mask=tmask[:, None] & dmask[None, :])

    @triton.jit
    def _gated_norm_kernel(o_ptr, z_ptr, w_ptr, y_ptr, T, H,
                           so_b, so_t, so_h, sz_b, sz_t, sz_h, eps,
                           D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
        """y[b, t, h, :] = o * rsqrt(mean(o^2) + eps) * w * silu(z) for BT tokens of head h."""
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
        d = tl.arange(0, BD)
        m = (t < T)[:, None] & (d < D)[None, :]
        o = tl.load(o_ptr + b * so_b + h * so_h + t[:, None] * so_t + d[None, :], mask=m, other=0)
        z = tl.load(z_ptr + b * sz_b + h * sz_h + t[:, None] * sz_t + d[None, :], mask=m, other=0)
        o, z = o.to(tl.float32), z.to(tl.float32)
        w = tl.load(w_ptr + d, mask=d < D, other=0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(o * o, axis=1) / D + eps)
        y = o * r[:, None] * w[None, :] * (z / (1.0 + tl.exp(-z)))
        dst = y_ptr + ((b * T + t[:, None]) * H + h) * D + d[None, :]
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=m)


def _new_conv_state(qkv: torch.Tensor, conv_state: torch.Tensor | None, k1: int) -> torch.Tensor:
    """The last K-1 pre-conv inputs [B, conv_dim, K-1] in qkv.dtype (state rows first, then qkv)."""
    B, T, C = qkv.shape
    if T >= k1:
        return qkv[:, T - k1:].transpose(1, 2)
    prev = (qkv.new_zeros(B, k1, C) if conv_state is None else conv_state.transpose(1, 2).to(qkv.dtype))
    return torch.cat([prev, qkv], 1)[:, -k1:].transpose(1, 2)


def conv_state_at(qkv: torch.Tensor, conv_state: torch.Tensor | None, k1: int, n_valid: torch.Tensor) -> torch.Tensor:
    """The K-1 pre-conv inputs before token ``n_valid`` of qkv (a device int tensor of one element; the tokens
    from it on are padding) [B, conv_dim, K-1] in qkv.dtype: the conv state after the first n_valid tokens.
    Device-side indexing only (no host read), so a CUDA graph can hold it."""
    B, T, C = qkv.shape
    prev = qkv.new_zeros(B, k1, C) if conv_state is None else conv_state.transpose(1, 2).to(qkv.dtype)
    rows = torch.cat([prev, qkv], 1)  # row i holds input i - k1
    idx = n_valid.reshape(1).long() + torch.arange(k1, device=qkv.device)
    return rows.index_select(1, idx).transpose(1, 2)


def gdn_prefill_prep_triton(qkv: torch.Tensor, conv_weight: torch.Tensor, conv_state: torch.Tensor | None,
                            hk: int, hv: int, dk: int, dv: int, q_scale: float, *,
                            block_t: int | None = None, num_warps: int = 4):
    """Triton version of gdn_prefill_prep_ref (block_t / num_warps are tuning knobs)."""
    B, T, C = qkv.shape
    K = conv_weight.shape[-1]
    w = conv_weight.reshape(C, K)
    if C != 2 * hk * dk + hv * dv:
        raise ValueError(f"conv_dim {C} != 2*{hk}*{dk} + {hv}*{dv}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    cd = torch.float32
    q = torch.empty(B, hk, T, dk, dtype=cd, device=qkv.device)
    k = torch.empty(B, hk, T, dk, dtype=cd, device=qkv.device)
    v = torch.empty(B, hv, T, dv, dtype=cd, device=qkv.device)
    st = conv_state if conv_state is not None else qkv  # unused without a state
    sstr = (st.stride(0), st.stride(1), st.stride(2)) if conv_state is not None else (0, 0, 0)
    for out, c0, nh, d, norm, scale in ((q, 0, hk, dk, True, q_scale), (k, hk * dk, hk, dk, True, 1.0),
                                        (v, 2 * hk * dk, hv, dv, False, 1.0)):
        bd = next_pow2(d)
        bt = block_t or max(1, min(2048 // bd, next_pow2(T)))  # 16 fp32 per thread: ~100 registers (sm_90)
        _conv_heads_kernel[(cdiv(T, bt), nh, B)](
            qkv, st, w, out, T, c0, nh,
            qkv.stride(0), qkv.stride(1), *sstr, w.stride(0),
            L2_EPS, float(scale),
            D=d, BD=bd, BT=bt, KC=K, NORM=norm, HAS_STATE=conv_state is not None, num_warps=num_warps,
        )
    return q, k, v, _new_conv_state(qkv, conv_state, K - 1)


def gated_rms_norm_triton(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float, *,
                          block_t: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Triton version of gated_rms_norm_ref for o, z [B, T, H, dv] (or [T, H, dv] / [H, dv])."""
    if o.shape != z.shape:
        raise ValueError(f"o {tuple(o.shape)} and z {tuple(z.shape)} differ")
    shape = o.shape
    while o.dim() < 4:
        o, z = o.unsqueeze(0), z.unsqueeze(0)
    if o.dim() != 4 or o.stride(-1) != 1 or z.stride(-1) != 1:  # rare: any other shape, one copy each
        o = o.reshape(-1, 1, *o.shape[-2:]).contiguous()
        z = z.reshape(-1, 1, *z.shape[-2:]).contiguous()
    B, T, H, D = o.shape
    y = torch.empty(B, T, H, D, dtype=z.dtype, device=z.device)
    bd = next_pow2(D)
    bt = block_t or max(1, min(4096 // bd, next_pow2(T)))
    _gated_norm_kernel[(cdiv(T, bt), H, B)](
        o, z, w, y, T, H, o.stride(0), o.stride(1), o.stride(2), z.stride(0), z.stride(1), z.stride(2),
        float(eps), D=D, BD=bd, BT=bt, num_warps=num_warps,
    )
    return y.reshape(shape)


# ----------------------------------------------------------------------------------------------
# dispatch: Triton on CUDA for inference; the torch references when autograd needs the graph
# ----------------------------------------------------------------------------------------------
def gdn_prefill_prep(qkv: torch.Tensor, conv_weight: torch.Tensor, conv_state: torch.Tensor | None,
                     hk: int, hv: int, dk: int, dv: int, q_scale: float):
    if (use_triton(qkv) and qkv.dtype != torch.float64
            and not _needs_grad(qkv, conv_weight, conv_state)):
        return gdn_prefill_prep_triton(qkv, conv_weight, conv_state, hk, hv, dk, dv, q_scale)
    return gdn_prefill_prep_ref(qkv, conv_weight, conv_state, hk, hv, dk, dv, q_scale)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if (use_triton(z) and o.dtype != torch.float64 and z.dtype != torch.float64
            and not _needs_grad(o, z, w)):
        return gated_rms_norm_triton(o, z, w, eps)
    return gated_rms_norm_ref(o, z, w, eps)
