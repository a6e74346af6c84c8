"""8-bit GEMV for decode (batch 1, 1..8 rows): y = x @ (q * scale).T, fp32 accumulation.

Layout (docs/contracts.md): qweight int8 [N, K]; scales fp16 [N, K/G] (one per group of G input
columns, G a power of two >= 16; olmo-local writes 32/64/128) or [N] (one per output row). The rank of
``scales`` selects the layout; the signatures are the same for both.

Ops (same signature for reference, Triton kernel and dispatch):
  q8_gemv(x, qweight, scales, out=None)            -> y [T, N]
  q8_gemv_silu_mul(x, qweight, scales, out=None)   -> silu(y[:, :I]) * y[:, I:] for a merged gate|up [2I, K]
x is [T, K] (or [K]); the result has x's dtype (and rank).

Kernel: a program owns BN rows and one K slice; it reads the weights as int32 words (16-byte loads,
each byte read once for all T rows) and turns a byte into the float 1 + (q + 128)/256 with one shift
and one mask^xor (no int->float conversion instructions), so that
    sum q*x = 256 * sum f*x - 384 * sum x;
the row scale is applied at the end. bf16 x is read as int32 pairs. Split-K partials are reduced by
the last program of a row block (self-resetting atomic counter): one deterministic, CUDA-graph
capturable launch.

Group scales: a K block never crosses a group (BK = min(block_k, G), and splits are whole blocks), so
each iteration loads one scale per row ([BN] values, L1-resident after the first row block touches
them). The block's sum f*x is formed in a fresh [BN, BW] tile and added to the accumulator times the
scale (one extra FMA per word column), and sum x is reduced to one number per block and accumulated as
scale * sum x per row. The per-row path (_q8_gemv_kernel, GW = 0) is its own kernel, with the same
signature and code as before.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, num_sms, pdl_kwargs, tl, triton, use_pdl, use_triton, workspace

if HAS_TRITON:
    from ._triton import emit_rows, pdl_launch_dependents, pdl_wait, splitk_finish

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
    x = _as_rows(x).to(torch.float32)
    if scales.dim() == 1:  # the row scale commutes with the dot product: (x @ q.T) * s
        return (x @ qweight.to(torch.float32).T) * scales.to(torch.float32)
    n, k = qweight.shape
    ng = scales.shape[1]
    w = qweight.to(torch.float32).reshape(n, ng, k // ng) * scales.to(torch.float32)[..., None]
    return x @ w.reshape(n, k).T


def q8_gemv_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W.T in fp32 with W = q * s (per row, or per group when scales is [N, K/G]); result in
    x.dtype."""
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
    def _byte_f(w, magic, j: tl.constexpr):
        """Byte j of int32 words (an int8 q) as the float 1 + (q + 128)/256 (bits moved to 15..22).

        magic = 0x3FC00000 (1.0 with the byte's top bit pre-flipped) is a run-time argument so that
        ptxas keeps it in a register and emits one LOP3 with the mask as immediate."""
        if j < 2:
            v = w << (15 - 8 * j)
        else:
            v = w >> (8 * j - 15)
        return ((v & 0x7F8000) ^ magic).to(tl.float32, bitcast=True)

    @triton.jit
    def _q8_block(acc, xsum, w, x_row, k0, bw, kmask, magic, X_BF16: tl.constexpr, EVEN_K: tl.constexpr):
        """acc += sum_j f_j * x_j, xsum += sum_j x_j for one [BN, BW] block of words (word m, byte j
        pairs with x[k0 + 4m + j])."""
        if X_BF16:  # x_row: int32 view of a bf16 row
            xb = x_row + (k0 // 2 + 2 * bw)
            for p in tl.static_range(2):
                if EVEN_K:
                    xp = tl.load(xb + p)
                else:
                    xp = tl.load(xb + p, mask=kmask, other=0)
                x0 = (xp << 16).to(tl.float32, bitcast=True)
                x1 = (xp & -65536).to(tl.float32, bitcast=True)
                acc = acc + _byte_f(w, magic, 2 * p) * x0[None, :]
                acc = acc + _byte_f(w, magic, 2 * p + 1) * x1[None, :]
                xsum = xsum + x0 + x1
        else:
            xb = x_row + k0 + 4 * bw
            for j in tl.static_range(4):
                if EVEN_K:
                    xv = tl.load(xb + j).to(tl.float32)
                else:
                    xv = tl.load(xb + j, mask=kmask, other=0).to(tl.float32)
                acc = acc + _byte_f(w, magic, j) * xv[None, :]
                xsum = xsum + xv
        return acc, xsum

    @triton.jit
    def _q8_step(acc, xs, w, x_row, k0, bw, kmask, magic, s, X_BF16: tl.constexpr, EVEN_K: tl.constexpr,
                 GROUPED: tl.constexpr):
        """One [BN, BW] block of words for one row of x. Per-row scales: _q8_block (scale applied in
        _q8_emit; xs is [BW]). Group scales s [BN] (this block lies in one group): the block's sums
        start from zero and are added as s * sum f*x ([BN, BW]) and s * sum x ([BN])."""
        if GROUPED:
            p, px = _q8_block(tl.zeros_like(acc), tl.zeros_like(bw).to(tl.float32), w, x_row, k0, bw, kmask,
                              magic, X_BF16, EVEN_K)
            acc = acc + p * s[:, None]
            xs = xs + s * tl.sum(px, 0)
        else:
            acc, xs = _q8_block(acc, xs, w, x_row, k0, bw, kmask, magic, X_BF16, EVEN_K)
        return acc, xs

    @triton.jit
    def _q8_rows(a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7, w, x_ptr, stride_x, k0, bw,
                 kmask, magic, sc, T: tl.constexpr, X_BF16: tl.constexpr, EVEN_K: tl.constexpr,
                 GROUPED: tl.constexpr):
        """One block of words for each of the T rows of x (named accumulators: Triton unrolls)."""
        a0, s0 = _q8_step(a0, s0, w, x_ptr, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 1:
            a1, s1 = _q8_step(a1, s1, w, x_ptr + stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 2:
            a2, s2 = _q8_step(a2, s2, w, x_ptr + 2 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 3:
            a3, s3 = _q8_step(a3, s3, w, x_ptr + 3 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 4:
            a4, s4 = _q8_step(a4, s4, w, x_ptr + 4 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 5:
            a5, s5 = _q8_step(a5, s5, w, x_ptr + 5 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 6:
            a6, s6 = _q8_step(a6, s6, w, x_ptr + 6 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        if T > 7:
            a7, s7 = _q8_step(a7, s7, w, x_ptr + 7 * stride_x, k0, bw, kmask, magic, sc, X_BF16, EVEN_K, GROUPED)
        return a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7

    @triton.jit
    def _q8_emit(y_ptr, part_ptr, s_ptr, acc_a, xs_a, acc_b, xs_b, t: tl.constexpr, pid_k, rn, rmask, NR,
                 stride_y, T: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr,
                 GROUPED: tl.constexpr):
        """Row t: sum q*x = 256 * sum f*x - 384 * sum x, times the row scale (group scales: already
        applied per block, xs is then [BN]); stored or written as a partial."""
        if GROUPED:
            ra = 256.0 * tl.sum(acc_a, 1) - 384.0 * xs_a
        else:
            ra = (256.0 * tl.sum(acc_a, 1) - 384.0 * tl.sum(xs_a, 0)) * tl.load(
                s_ptr + rn, mask=rmask, other=0).to(tl.float32)
        rb = ra
        if GATED:
            if GROUPED:
                rb = 256.0 * tl.sum(acc_b, 1) - 384.0 * xs_b
            else:
                rb = (256.0 * tl.sum(acc_b, 1) - 384.0 * tl.sum(xs_b, 0)) * tl.load(
                    s_ptr + NR + rn, mask=rmask, other=0).to(tl.float32)
        emit_rows(y_ptr, part_ptr, ra, rb, t, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)

    @triton.jit
    def _q8_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr,
        NR,  # output rows (N, or I for the gated variant)
        KW,  # int32 words per weight row = K // 4
        stride_x, stride_y,  # x row stride in x_ptr elements, y row stride
        WPS,  # int32 words per split (a multiple of BW)
        SPLIT,  # number of splits (run time)
        MAGIC,  # 0x3FC00000, passed at run time on purpose: see _byte_f
        T: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
        GATED: tl.constexpr, X_BF16: tl.constexpr, EVEN_K: tl.constexpr,
        USE_PDL: tl.constexpr = False,
    ):
        """Per-row scales s [N]. USE_PDL: programmatic dependent launch (the first block's weights before the
        wait)."""
        _q8_gemv_body(x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, NR, KW, stride_x, stride_y, WPS, SPLIT,
                      MAGIC, T, BN, BW, SPLIT_K, GATED, X_BF16, EVEN_K, 0, USE_PDL)

    @triton.jit
    def _q8_gemv_grouped_kernel(
        x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, NR, KW, stride_x, stride_y, WPS, SPLIT, MAGIC,
        T: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
        GATED: tl.constexpr, X_BF16: tl.constexpr, EVEN_K: tl.constexpr,
        GW: tl.constexpr,  # int32 words per scale group: G / 4, a multiple of BW
        USE_PDL: tl.constexpr = False,
    ):
        """Group scales s [N, K/G]; arguments as _q8_gemv_kernel's."""
        _q8_gemv_body(x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, NR, KW, stride_x, stride_y, WPS, SPLIT,
                      MAGIC, T, BN, BW, SPLIT_K, GATED, X_BF16, EVEN_K, GW, USE_PDL)

    @triton.jit
    def _q8_block_load(wa_ptr, wb_ptr, s_ptr, rn, rmask, bw, w0, w_end, NG, NR, BN: tl.constexpr, GW: tl.constexpr,
                       GATED: tl.constexpr, EVEN_K: tl.constexpr, GROUPED: tl.constexpr):
        """The weight words (and, grouped, the rows' scales) of the block at word w0, with the up rows when
        gated."""
        if EVEN_K:  # no column mask: keeps the 16-byte weight loads vectorized
            kmask = rmask  # unused
            wmask = rmask[:, None]
        else:
            kmask = w0 + bw < w_end
            wmask = rmask[:, None] & kmask[None, :]
        wa = tl.load(wa_ptr + w0, mask=wmask, other=0)
        sa = tl.zeros([BN], dtype=tl.float32)
        if GROUPED:  # one scale per row for this block (it lies inside one group)
            sa = tl.load(s_ptr + rn * NG + w0 // GW, mask=rmask, other=0).to(tl.float32)
        wb = wa
        sb = sa
        if GATED:
            wb = tl.load(wb_ptr + w0, mask=wmask, other=0)
            if GROUPED:
                sb = tl.load(s_ptr + (NR + rn) * NG + w0 // GW, mask=rmask, other=0).to(tl.float32)
        return wa, sa, wb, sb, kmask

    @triton.jit
    def _q8_gemv_body(
        x_ptr, qw_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, NR, KW, stride_x, stride_y, WPS, SPLIT, MAGIC,
        T: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
        GATED: tl.constexpr, X_BF16: tl.constexpr, EVEN_K: tl.constexpr,
        GW: tl.constexpr,  # int32 words per scale group (G / 4), 0: per-row scales
        USE_PDL: tl.constexpr = False,
    ):
        pdl_launch_dependents(USE_PDL)
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rmask = rn < NR
        bw = tl.arange(0, BW)
        z2 = tl.zeros([BN, BW], dtype=tl.float32)
        z1 = tl.zeros([BW], dtype=tl.float32)
        GROUPED: tl.constexpr = GW > 0
        NG = 1
        if GROUPED:
            NG = KW // GW  # scales per weight row
            zx = tl.zeros([BN], dtype=tl.float32)  # sum of scale * sum x, per row
        else:
            zx = z1  # sum x per word column; the row scale is applied in _q8_emit
        sa = tl.zeros([BN], dtype=tl.float32)  # this block's group scales (GROUPED only)
        sb = sa
        a0, a1, a2, a3, a4, a5, a6, a7 = z2, z2, z2, z2, z2, z2, z2, z2
        b0, b1, b2, b3, b4, b5, b6, b7 = z2, z2, z2, z2, z2, z2, z2, z2
        s0, s1, s2, s3, s4, s5, s6, s7 = zx, zx, zx, zx, zx, zx, zx, zx
        u0, u1, u2, u3, u4, u5, u6, u7 = zx, zx, zx, zx, zx, zx, zx, zx
        w_begin = pid_k * WPS
        w_end = tl.minimum(w_begin + WPS, KW)
        wa_ptr = qw_ptr + rn[:, None] * KW + bw[None, :]
        wb_ptr = wa_ptr + NR * KW
        # the first block peeled: its weights (written by no kernel) load before waiting for the previous kernel
        # (USE_PDL; without PDL the wait is a no-op and the peel changes nothing)
        wa0, sa0, wb0, sb0, kmask0 = _q8_block_load(wa_ptr, wb_ptr, s_ptr, rn, rmask, bw, w_begin, w_end, NG,
                                                    NR, BN, GW, GATED, EVEN_K, GROUPED)
        pdl_wait(USE_PDL)
        a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7 = _q8_rows(
            a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7, wa0, x_ptr, stride_x, 4 * w_begin,
            bw, kmask0, MAGIC, sa0, T, X_BF16, EVEN_K, GROUPED)
        if GATED:
            b0, b1, b2, b3, b4, b5, b6, b7, u0, u1, u2, u3, u4, u5, u6, u7 = _q8_rows(
                b0, b1, b2, b3, b4, b5, b6, b7, u0, u1, u2, u3, u4, u5, u6, u7, wb0, x_ptr, stride_x,
                4 * w_begin, bw, kmask0, MAGIC, sb0, T, X_BF16, EVEN_K, GROUPED)
        w_first = w_begin + BW
        for w0 in range(w_first, w_end, BW):
            k0 = 4 * w0
            wa, sa, wb, sb, kmask = _q8_block_load(wa_ptr, wb_ptr, s_ptr, rn, rmask, bw, w0, w_end, NG, NR, BN, GW,
                                                   GATED, EVEN_K, GROUPED)
            a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7 = _q8_rows(
                a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7, wa, x_ptr, stride_x, k0, bw,
                kmask, MAGIC, sa, T, X_BF16, EVEN_K, GROUPED)
            if GATED:
                b0, b1, b2, b3, b4, b5, b6, b7, u0, u1, u2, u3, u4, u5, u6, u7 = _q8_rows(
                    b0, b1, b2, b3, b4, b5, b6, b7, u0, u1, u2, u3, u4, u5, u6, u7, wb, x_ptr, stride_x, k0,
                    bw, kmask, MAGIC, sb, T, X_BF16, EVEN_K, GROUPED)

        _q8_emit(y_ptr, part_ptr, s_ptr, a0, s0, b0, u0, 0, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                 GATED, GROUPED)
        if T > 1:
            _q8_emit(y_ptr, part_ptr, s_ptr, a1, s1, b1, u1, 1, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 2:
            _q8_emit(y_ptr, part_ptr, s_ptr, a2, s2, b2, u2, 2, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 3:
            _q8_emit(y_ptr, part_ptr, s_ptr, a3, s3, b3, u3, 3, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 4:
            _q8_emit(y_ptr, part_ptr, s_ptr, a4, s4, b4, u4, 4, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 5:
            _q8_emit(y_ptr, part_ptr, s_ptr, a5, s5, b5, u5, 5, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 6:
            _q8_emit(y_ptr, part_ptr, s_ptr, a6, s6, b6, u6, 6, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if T > 7:
            _q8_emit(y_ptr, part_ptr, s_ptr, a7, s7, b7, u7, 7, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K,
                     GATED, GROUPED)
        if SPLIT_K:
            splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rmask, NR, stride_y, T, BN, SPLIT, GATED)


def _group_size(qweight: torch.Tensor, scales: torch.Tensor) -> int | None:
    """0 for per-row scales [N]; G for group scales [N, K/G] that the kernel takes (G a power of two,
    at least 16); None for anything else."""
    n, k = qweight.shape
    if scales.dim() == 1:
        return 0 if scales.shape[0] == n else None
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
        return None
    g = k // scales.shape[1]
    return g if g >= 16 and g & (g - 1) == 0 else None


# programmatic dependent launch for the q8 GEMVs (the lm_head of q4 models): the launch is made while the
# previous kernel runs, the first block's weights load before its wait, and the kernel lets its successor (the
# pick) launch at once
Q8_PDL = True


def _q8_launch(x, qweight, scales, out, gated, block_n, block_k, split_k, num_warps, num_stages):
    x2 = _as_rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, k = x2.shape
    n_w, kw = qweight.shape
    g = _group_size(qweight, scales)
    if kw != k or g is None or k % 4:
        raise ValueError(f"q8 shapes: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)} (K must be a multiple of 4; scales [N] or [N, K/G] with G "
                         "a power of two >= 16)")
    if not 1 <= t <= 8:
        raise ValueError(f"q8_gemv takes 1..8 rows, got {t}")
    nr = n_w // 2 if gated else n_w
    qweight = qweight.contiguous()
    if qweight.data_ptr() % 16:
        qweight = qweight.clone()
    qw32 = qweight.view(torch.int32)  # [N, K/4]: 4 int8 per word
    scales = scales.contiguous()
    x_bf16 = x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0 and x2.stride(0) % 2 == 0
    x_arg = x2.view(torch.int32) if x_bf16 else x2
    stride_x = x2.stride(0) // 2 if x_bf16 else x2.stride(0)
    if out is None:
        shape = (nr,) if x.dim() == 1 else (t, nr)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = _as_rows(out)
    if y2.stride(-1) != 1 or tuple(y2.shape) != (t, nr):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(t, nr)} with a unit last stride")

    # BN rows x BK bytes per iteration: with 4 warps each thread holds 2 rows x 16 bytes
    if g:
        # a block never crosses a scale group (both are powers of two). Default: the group as K block
        # and, ungated, 8 KB tiles (64 weights per thread), which spread the per-block costs (x, the
        # scale, one sum of x) over twice the weights: sm_90 SASS 4.8 vs 5.9 instructions per weight
        # for G = 128 (per-row q8: 4.8 at its default tile, 4.0 at BN=32, BK=256). H200: the g128
        # 3840x100352 lm_head takes 112 us (86 % of copy) at this default.
        bk = min(block_k or g, g)
        tile = 4096 if gated else 8192
    else:
        # per-row scales: 256-byte K blocks and 8 KB tiles when K allows (H200, 3840x100352 lm_head:
        # 91 us at BN=32, BK=256 vs 206 us at BK=64 — the longer row pieces keep more bytes in flight)
        bk = block_k or (256 if k % 256 == 0 else 64)
        tile = 8192 if bk == 256 and not gated else 4096
    bw = bk // 4
    bn = block_n or max(16, min(tile // bk, next_pow2(nr)))
    if block_n is None and t * (2 if gated else 1) > 4:
        bn = max(16, bn // 2)  # one accumulator per row of x (and half): keep them in registers
    sms = num_sms(x.device)
    if block_n is None and g and not gated and t == 1 and cdiv(nr, 2 * bn) >= 4 * sms:
        # a tall grouped GEMV without split-K (the lm_head): twice the rows per program. H200, 3840 x
        # 100352 g128 head alone: 104.5 us at 128 rows vs 109.0 at 64 (scripts/gpu_head_probe.py)
        bn *= 2
    iters = cdiv(k, bk)
    n_blocks = cdiv(nr, bn)
    if split_k is None:
        split_k = 1 if n_blocks >= 4 * sms else max(1, min(cdiv(6 * sms, n_blocks), iters // 2))
    split_k = max(1, min(int(split_k), iters))
    per_split = cdiv(iters, split_k)
    split_k = cdiv(iters, per_split)  # no empty splits
    if split_k > 1:
        part = workspace("q8_part", (split_k, t, n_w), torch.float32, x.device)
        cnt = workspace("q8_cnt", (n_blocks,), torch.int32, x.device)
    else:
        part = cnt = y2  # unused
    args = (x_arg, qw32, scales, y2, part, cnt, nr, k // 4, stride_x, y2.stride(0), per_split * bw, split_k,
            0x3FC00000)
    pdl = Q8_PDL and use_pdl(x2)
    meta = dict(T=t, BN=bn, BW=bw, SPLIT_K=split_k > 1, GATED=gated, X_BF16=x_bf16, EVEN_K=k % bk == 0,
                USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(pdl))
    if g:
        _q8_gemv_grouped_kernel[(split_k, n_blocks)](*args, GW=g // 4, **meta)
    else:
        _q8_gemv_kernel[(split_k, n_blocks)](*args, **meta)
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
    num_stages: int = 2,
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
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton version of q8_gemv_silu_mul_ref."""
    if qweight.shape[0] % 2:
        raise ValueError("a merged gate|up weight needs an even number of rows")
    return _q8_launch(x, qweight, scales, out, True, block_n, block_k, split_k, num_warps, num_stages)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _fits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """The decode kernel takes 1..8 rows, K % 4 == 0 and per-row or power-of-two (>= 16) group scales;
    anything else goes to the reference path."""
    return (x.dim() == 1 or x.shape[0] <= 8) and qweight.shape[1] % 4 == 0 \
        and _group_size(qweight, scales) is not None


def q8_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if use_triton(x) and _fits(x, qweight, scales):
        return q8_gemv_triton(x, qweight, scales, out)
    return q8_gemv_ref(x, qweight, scales, out)


def q8_gemv_silu_mul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if use_triton(x) and _fits(x, qweight, scales):
        return q8_gemv_silu_mul_triton(x, qweight, scales, out)
    return q8_gemv_silu_mul_ref(x, qweight, scales, out)
