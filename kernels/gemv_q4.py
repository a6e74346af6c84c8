"""4-bit grouped GEMV for decode (batch 1, 1..8 rows): y = x @ dequant(W).T, fp32 accumulation.

Layout (docs/contracts.md): W [N, K], group size G (32/64/128), K % G == 0.
  qweight uint8 [N, K//2]: in group g (bytes g*G/2 .. g*G/2+G/2-1) byte i holds column g*G+i in its
  low nibble and column g*G+G/2+i in its high nibble.
  scales, mins fp16 [N, K//G]; w = q * scale + min, q in 0..15.

Ops (same signature for reference, Triton kernel and dispatch):
  q4_gemv(x, qweight, scales, mins, group_size, out=None)            -> y [T, N]
  q4_gemv_silu_mul(x, qweight, scales, mins, group_size, out=None)   -> silu(y[:, :I]) * y[:, I:], [T, I]
x is [T, K] (or [K]), bf16/fp16/fp32; the result has x's dtype (and rank).

Kernel: one program owns BN output rows (BN gate rows + the matching BN up rows for the gated
variant) and one slice of K (split-K). It loads packed bytes as a [BN, NG, G/2] tile (16-byte loads;
the low and high nibbles pair with two contiguous runs of x), turns nibbles into floats with the
2**23 bit trick (no int->float conversion instructions), forms per-group dots sum(q*x) and applies
scale and min per group: y += s * sum(q*x) + m * sum(x). Each weight byte is read once for all T
rows. With split-K each program writes an fp32 partial; the last program of a row block (an atomic
counter that resets itself) adds the partials in a fixed order and writes the result, so the op is
one launch, deterministic, and CUDA-graph capturable (workspace allocated on first use).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, num_sms, tl, triton, use_triton, workspace

__all__ = [
    "q4_dequantize",
    "q4_gemv",
    "q4_gemv_ref",
    "q4_gemv_silu_mul",
    "q4_gemv_silu_mul_ref",
    "q4_gemv_silu_mul_triton",
    "q4_gemv_triton",
]


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def q4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed q4 weight -> fp32 [N, K]."""
    n, kb = qweight.shape
    g = group_size
    k = kb * 2
    if k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    packed = qweight.reshape(n, k // g, g // 2)
    q = torch.cat([packed & 0xF, packed >> 4], dim=2).to(torch.float32)  # [N, K/G, G]
    w = q * scales.to(torch.float32).unsqueeze(2) + mins.to(torch.float32).unsqueeze(2)
    return w.reshape(n, k)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _finish(y: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 1:
        y = y.squeeze(0)
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


def q4_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T with W dequantized in fp32; result in x.dtype."""
    w = q4_dequantize(qweight, scales, mins, group_size)
    y = _as_rows(x).to(torch.float32) @ w.T
    return _finish(y, x, out)


def q4_gemv_silu_mul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """For a merged gate|up weight [2I, K]: silu(x @ Wg.T) * (x @ Wu.T), fp32 math, x.dtype result."""
    w = q4_dequantize(qweight, scales, mins, group_size)
    y = _as_rows(x).to(torch.float32) @ w.T
    i = w.shape[0] // 2
    y = torch.nn.functional.silu(y[:, :i]) * y[:, i:]
    return _finish(y, x, out)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _q4_load_tile(qw_ptr, s_ptr, m_ptr, rows, rmask, gi, gmask, boff, NGR, HG: tl.constexpr):
        """Nibbles of a [BN, NG, HG] byte tile as exact fp32 (low, high) plus scales/mins [BN, NG]."""
        wmask = rmask[:, None, None] & gmask[None, :, None]
        b = tl.load(qw_ptr + rows[:, None, None] * (NGR * HG) + boff[None, :, :], mask=wmask, other=0)
        b = b.to(tl.int32)
        # OR-ing a nibble into the mantissa of 2**23 gives exactly 2**23 + q (no I2F instruction)
        lo = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        smask = rmask[:, None] & gmask[None, :]
        soff = rows[:, None] * NGR + gi[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0).to(tl.float32)
        m = tl.load(m_ptr + soff, mask=smask, other=0).to(tl.float32)
        return lo, hi, s, m

    @triton.jit
    def _q4_rows_store(y_ptr, acc_a, acc_b, rn, rmask, tr, stride_y, T: tl.constexpr, GATED: tl.constexpr):
        if GATED:
            val = acc_a / (1.0 + tl.exp(-acc_a)) * acc_b
        else:
            val = acc_a
        msk = (tr[:, None] < T) & rmask[None, :]
        tl.store(y_ptr + tr[:, None] * stride_y + rn[None, :], val.to(y_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _q4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, part_ptr, cnt_ptr,
        NR,  # output rows (N, or I for the gated variant whose weight has 2*I rows)
        NGR,  # groups per weight row = K // G
        stride_x, stride_y,
        GPS,  # groups per split (a multiple of NG)
        T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, BN: tl.constexpr,
        SPLIT: tl.constexpr, GATED: tl.constexpr,
    ):
        HG: tl.constexpr = G // 2
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rmask = rn < NR
        hg = tl.arange(0, HG)
        gg = tl.arange(0, NG)
        tr = tl.arange(0, TP)
        acc_a = tl.zeros([TP, BN], dtype=tl.float32)
        acc_b = tl.zeros([TP, BN], dtype=tl.float32)
        g_begin = pid_k * GPS
        g_end = tl.minimum(g_begin + GPS, NGR)
        for g0 in range(g_begin, g_end, NG):
            gi = g0 + gg
            gmask = gi < g_end
            boff = gi[:, None] * HG + hg[None, :]  # byte column inside a weight row
            xcol = gi[:, None] * G + hg[None, :]  # x column paired with the low nibbles
            lo_a, hi_a, s_a, m_a = _q4_load_tile(qw_ptr, s_ptr, m_ptr, rn, rmask, gi, gmask, boff, NGR, HG)
            if GATED:
                lo_b, hi_b, s_b, m_b = _q4_load_tile(
                    qw_ptr, s_ptr, m_ptr, rn + NR, rmask, gi, gmask, boff, NGR, HG
                )
            for t in tl.static_range(T):
                xl = tl.load(x_ptr + t * stride_x + xcol, mask=gmask[:, None], other=0).to(tl.float32)
                xh = tl.load(x_ptr + t * stride_x + xcol + HG, mask=gmask[:, None], other=0).to(tl.float32)
                xs = tl.sum(xl + xh, axis=1)  # [NG] per-group sum of x (for the mins)
                d_a = tl.sum(lo_a * xl[None, :, :] + hi_a * xh[None, :, :], axis=2)  # [BN, NG]
                r_a = tl.sum(d_a * s_a + m_a * xs[None, :], axis=1)  # [BN]
                if T == 1:
                    acc_a += r_a[None, :]
                else:
                    acc_a += tl.where(tr[:, None] == t, r_a[None, :], 0.0)
                if GATED:
                    d_b = tl.sum(lo_b * xl[None, :, :] + hi_b * xh[None, :, :], axis=2)
                    r_b = tl.sum(d_b * s_b + m_b * xs[None, :], axis=1)
                    if T == 1:
                        acc_b += r_b[None, :]
                    else:
                        acc_b += tl.where(tr[:, None] == t, r_b[None, :], 0.0)

        if SPLIT == 1:
            _q4_rows_store(y_ptr, acc_a, acc_b, rn, rmask, tr, stride_y, T, GATED)
        else:
            # write this split's partial, then the last program of the row block reduces
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
                _q4_rows_store(y_ptr, tot_a, tot_b, rn, rmask, tr, stride_y, T, GATED)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


def _q4_launch(x, qweight, scales, mins, group_size, out, gated, block_n, block_k, split_k, num_warps, num_stages):
    x2 = _as_rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, k = x2.shape
    n_w, kb = qweight.shape
    g = int(group_size)
    if kb * 2 != k or k % g or g % 2 or g & (g - 1):
        raise ValueError(f"q4 shapes: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, group {g}")
    if not 1 <= t <= 16:
        raise ValueError(f"q4_gemv takes 1..16 rows, got {t}")
    nr = n_w // 2 if gated else n_w
    ngr = k // g
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    mins = mins.contiguous()
    if out is None:
        shape = (nr,) if x.dim() == 1 else (t, nr)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = _as_rows(out)
    if y2.stride(-1) != 1 or tuple(y2.shape) != (t, nr):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(t, nr)} with a unit last stride")

    bn = block_n or 32
    ng = max(1, (block_k or 256) // g)
    iters = cdiv(ngr, ng)
    n_blocks = cdiv(nr, bn)
    if split_k is None:
        sms = num_sms(x.device)
        split_k = 1 if n_blocks >= 2 * sms else min(cdiv(4 * sms, n_blocks), max(1, iters // 2))
    split_k = max(1, min(int(split_k), iters))
    per_split = cdiv(iters, split_k)
    split_k = cdiv(iters, per_split)  # no empty splits
    gps = per_split * ng
    if split_k > 1:
        part = workspace("q4_part", (split_k, t, n_w), torch.float32, x.device)
        cnt = workspace("q4_cnt", (n_blocks,), torch.int32, x.device)
    else:
        part = cnt = y2  # unused
    _q4_gemv_kernel[(split_k, n_blocks)](
        x2, qweight, scales, mins, y2, part, cnt,
        nr, ngr, x2.stride(0), y2.stride(0), gps,
        T=t, TP=next_pow2(t), G=g, NG=ng, BN=bn, SPLIT=split_k, GATED=gated,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def q4_gemv_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton version of q4_gemv_ref (the keyword-only knobs are for tests and tuning)."""
    return _q4_launch(x, qweight, scales, mins, group_size, out, False, block_n, block_k, split_k,
                      num_warps, num_stages)


def q4_gemv_silu_mul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton version of q4_gemv_silu_mul_ref (gate and up rows of one block share a program)."""
    if qweight.shape[0] % 2:
        raise ValueError("a merged gate|up weight needs an even number of rows")
    return _q4_launch(x, qweight, scales, mins, group_size, out, True, block_n, block_k, split_k,
                      num_warps, num_stages)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def q4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_triton(x):
        return q4_gemv_triton(x, qweight, scales, mins, group_size, out)
    return q4_gemv_ref(x, qweight, scales, mins, group_size, out)


def q4_gemv_silu_mul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_triton(x):
        return q4_gemv_silu_mul_triton(x, qweight, scales, mins, group_size, out)
    return q4_gemv_silu_mul_ref(x, qweight, scales, mins, group_size, out)
