"""8-bit per-row GEMV for decode (batch 1, 1..8 rows): y = x @ (q * scale).T, fp32 accumulation.

Layout (docs/contracts.md): qweight int8 [N, K], scales fp16 [N] (symmetric, per output row).

Ops (same signature for reference, Triton kernel and dispatch):
  q8_gemv(x, qweight, scales, out=None)            -> y [T, N]
  q8_gemv_silu_mul(x, qweight, scales, out=None)   -> silu(y[:, :I]) * y[:, I:] for a merged gate|up [2I, K]
x is [T, K] (or [K]); the result has x's dtype (and rank).

Kernel: a program owns BN rows and one K slice; it reads the int8 tile once (16-byte loads) for all
T rows, converts bytes to floats with the 2**23 bit trick, accumulates in fp32, applies the row scale
at the end. Split-K partials are reduced by the last program of a row block (self-resetting atomic
counter), so the op is a single, deterministic, CUDA-graph capturable launch.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, num_sms, tl, triton, use_triton, workspace

__all__ = [
    "q8_gemv",
    "q8_gemv_ref",
    "q8_gemv_silu_mul",
    "q8_gemv_silu_mul_ref",
    "q8_gemv_silu_mul_triton",
    "q8_gemv_triton",
]


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _finish(y: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 1:
        y = y.squeeze(0)
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


def _q8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # the row scale commutes with the dot product: (x @ q.T) * s
    return (_as_rows(x).to(torch.float32) @ qweight.to(torch.float32).T) * scales.to(torch.float32)


def q8_gemv_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (q * s).T in fp32; result in x.dtype."""
    return _finish(_q8_matmul(x, qweight, scales), x, out)


def q8_gemv_silu_mul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """For a merged gate|up weight [2I, K]: silu(gate) * up in fp32; result in x.dtype."""
    y = _q8_matmul(x, qweight, scales)
    i = qweight.shape[0] // 2
    return _finish(torch.nn.functional.silu(y[:, :i]) * y[:, i:], x, out)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _q8_load_tile(qw_ptr, rows, rmask, kc, kmask, K):
        b = tl.load(qw_ptr + rows[:, None] * K + kc[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
        b = b.to(tl.int32)  # the int8 bits read as uint8
        # (b ^ 0x80) = q + 128 in 0..255; in the mantissa of 2**23 that is exactly 2**23 + 128 + q
        return ((b ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _q8_rows_store(y_ptr, s_ptr, acc_a, acc_b, rn, rmask, tr, stride_y, NR,
                       T: tl.constexpr, GATED: tl.constexpr):
        s_a = tl.load(s_ptr + rn, mask=rmask, other=0).to(tl.float32)
        val = acc_a * s_a[None, :]
        if GATED:
            s_b = tl.load(s_ptr + rn + NR, mask=rmask, other=0).to(tl.float32)
            up = acc_b * s_b[None, :]
            val = val / (1.0 + tl.exp(-val)) * up
        msk = (tr[:, None] < T) & rmask[None, :]
        tl.store(y_ptr + tr[:, None] * stride_y + rn[None, :], val.to(y_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _q8_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr,
        NR,  # output rows (N, or I for the gated variant)
        K, stride_x, stride_y,
        KPS,  # columns per split (a multiple of BK)
        T: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        SPLIT: tl.constexpr, GATED: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rmask = rn < NR
        kk = tl.arange(0, BK)
        tr = tl.arange(0, TP)
        acc_a = tl.zeros([TP, BN], dtype=tl.float32)
        acc_b = tl.zeros([TP, BN], dtype=tl.float32)
        # T == 1: elementwise accumulators, reduced once after the loop
        acc2_a = tl.zeros([BN, BK], dtype=tl.float32)
        acc2_b = tl.zeros([BN, BK], dtype=tl.float32)
        k_begin = pid_k * KPS
        k_end = tl.minimum(k_begin + KPS, K)
        for k0 in range(k_begin, k_end, BK):
            kc = k0 + kk
            kmask = kc < k_end
            q_a = _q8_load_tile(qw_ptr, rn, rmask, kc, kmask, K)
            if GATED:
                q_b = _q8_load_tile(qw_ptr, rn + NR, rmask, kc, kmask, K)
            for t in tl.static_range(T):
                xv = tl.load(x_ptr + t * stride_x + kc, mask=kmask, other=0).to(tl.float32)
                if T == 1:
                    acc2_a += q_a * xv[None, :]
                    if GATED:
                        acc2_b += q_b * xv[None, :]
                else:
                    acc_a += tl.where(tr[:, None] == t, tl.sum(q_a * xv[None, :], axis=1)[None, :], 0.0)
                    if GATED:
                        acc_b += tl.where(tr[:, None] == t, tl.sum(q_b * xv[None, :], axis=1)[None, :], 0.0)
        if T == 1:
            acc_a = tl.sum(acc2_a, axis=1)[None, :]
            if GATED:
                acc_b = tl.sum(acc2_b, axis=1)[None, :]

        if SPLIT == 1:
            _q8_rows_store(y_ptr, s_ptr, acc_a, acc_b, rn, rmask, tr, stride_y, NR, T, GATED)
        else:
            if GATED:
                ntot = 2 * NR
            else:
                ntot = NR
            pmask = (tr[:, None] < T) & rmask[None, :]
            poff = tr[:, None] * ntot + rn[None, :]
            tl.store(part_ptr + pid_k * (T * ntot) + poff, acc_a, mask=pmask)
            if GATED:
                tl.store(part_ptr + pid_k * (T * ntot) + poff + NR, acc_b, mask=pmask)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + pid_n, 1)
            if done == SPLIT - 1:
                tot_a = tl.zeros([TP, BN], dtype=tl.float32)
                tot_b = tl.zeros([TP, BN], dtype=tl.float32)
                for s in range(SPLIT):
                    tot_a += tl.load(part_ptr + s * (T * ntot) + poff, mask=pmask, other=0.0,
                                     cache_modifier=".cg")
                    if GATED:
                        tot_b += tl.load(part_ptr + s * (T * ntot) + poff + NR, mask=pmask, other=0.0,
                                         cache_modifier=".cg")
                _q8_rows_store(y_ptr, s_ptr, tot_a, tot_b, rn, rmask, tr, stride_y, NR, T, GATED)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


def _q8_launch(x, qweight, scales, out, gated, block_n, block_k, split_k, num_warps, num_stages):
    x2 = _as_rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, k = x2.shape
    n_w, kw = qweight.shape
    if kw != k or scales.numel() != n_w:
        raise ValueError(f"q8 shapes: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}")
    if not 1 <= t <= 16:
        raise ValueError(f"q8_gemv takes 1..16 rows, got {t}")
    nr = n_w // 2 if gated else n_w
    qbytes = qweight.contiguous().view(torch.uint8)
    scales = scales.contiguous()
    if out is None:
        shape = (nr,) if x.dim() == 1 else (t, nr)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = _as_rows(out)
    if y2.stride(-1) != 1 or tuple(y2.shape) != (t, nr):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(t, nr)} with a unit last stride")

    bn = block_n or 32
    bk = block_k or 128
    iters = cdiv(k, bk)
    n_blocks = cdiv(nr, bn)
    if split_k is None:
        sms = num_sms(x.device)
        split_k = 1 if n_blocks >= 2 * sms else min(cdiv(4 * sms, n_blocks), max(1, iters // 4))
    split_k = max(1, min(int(split_k), iters))
    per_split = cdiv(iters, split_k)
    split_k = cdiv(iters, per_split)
    if split_k > 1:
        part = workspace("q8_part", (split_k, t, n_w), torch.float32, x.device)
        cnt = workspace("q8_cnt", (n_blocks,), torch.int32, x.device)
    else:
        part = cnt = y2  # unused
    _q8_gemv_kernel[(split_k, n_blocks)](
        x2, qbytes, scales, y2, part, cnt,
        nr, k, x2.stride(0), y2.stride(0), per_split * bk,
        T=t, TP=next_pow2(t), BN=bn, BK=bk, SPLIT=split_k, GATED=gated,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def q8_gemv_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton version of q8_gemv_ref (the keyword-only knobs are for tests and tuning)."""
    return _q8_launch(x, qweight, scales, out, False, block_n, block_k, split_k, num_warps, num_stages)


def q8_gemv_silu_mul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton version of q8_gemv_silu_mul_ref."""
    if qweight.shape[0] % 2:
        raise ValueError("a merged gate|up weight needs an even number of rows")
    return _q8_launch(x, qweight, scales, out, True, block_n, block_k, split_k, num_warps, num_stages)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def q8_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if use_triton(x):
        return q8_gemv_triton(x, qweight, scales, out)
    return q8_gemv_ref(x, qweight, scales, out)


def q8_gemv_silu_mul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if use_triton(x):
        return q8_gemv_silu_mul_triton(x, qweight, scales, out)
    return q8_gemv_silu_mul_ref(x, qweight, scales, out)
