"""4-bit grouped GEMV for decode (batch 1, 1..8 rows): y = x @ dequant(W).T, fp32 accumulation.

Layout (docs/contracts.md): W [N, K], group size G (32/64/128), K % G == 0.
  qweight uint8 [N, K//2]: in group g (bytes g*G/2 .. g*G/2+G/2-1) byte i holds column g*G+i in its
  low nibble and column g*G+G/2+i in its high nibble.
  scales, mins fp16 [N, K//G]; w = q * scale + min, q in 0..15.

Ops (same signature for reference, Triton kernel and dispatch):
  q4_gemv(x, qweight, scales, mins, group_size, out=None)            -> y [T, N]
  q4_gemv_silu_mul(x, qweight, scales, mins, group_size, out=None)   -> silu(y[:, :I]) * y[:, I:], [T, I]
  q4_gemv_fold(x, qweight, scales, mins, group_size, residual, w=None)  -> (residual + y, (residual + y) * w,
      sums of squares): a projection whose output goes into the residual stream with the next pre-norm
      folded in; its consumer passes rstd=(sums, eps) to q4_gemv / q4_gemv_silu_mul, which scale their
      rows by rsqrt(sum / K + eps): rmsnorm(x_new) * w @ W.T without a norm launch.
x is [T, K] (or [K]), bf16/fp16/fp32; the result has x's dtype (and rank).

Tiled layout (``tiled=True``; q4_tile / q4_untile convert): the same bytes and scales, but inside each
slab of TILE_ROWS = 64 rows the order (row, group) becomes (group, row), so that group g of a slab is
one contiguous 64 x G/2-byte block (4 KB at G = 128) and a slab is one contiguous run in K order. The
decode GEMV then reads each program's weights as a single sequential stream instead of 64-byte pieces
of 64 rows 1,920 bytes apart (the load-only probe streamed that pattern at 43-66 % of copy bandwidth,
the same matrices in long runs at 77-87 %). Used on CUDA only (the model tiles its q4 linears when it
is placed on a GPU, rows a multiple of 64); files and CPU paths keep the standard layout.

Kernel: one program owns BN output rows (BN gate rows + the matching BN up rows for the gated
variant) and one slice of K (split-K), and walks it one group at a time. The packed weights are read
as int32 words (a [BN, G/8] tile, 16-byte loads, each byte read once for all T rows); a nibble
becomes the float 1 + q/128 with one shift and one mask|or (no int->float conversion, which runs at
a quarter of the FMA rate on Hopper), so that per group
    y += 128*s * sum(f*x) + (m - 128*s) * sum(x)  ==  s * sum(q*x) + m * sum(x).
bf16 x is read as int32 pairs and unpacked with shifts. Accumulators stay elementwise [BN, G/8]
(reduced once at the end: no shuffles or layout changes inside the loop). With split-K each program
writes an fp32 partial and the last program of a row block (a self-resetting atomic counter) adds
the partials in a fixed order: one launch, deterministic, CUDA-graph capturable (workspace allocated
on first use).
"""

from __future__ import annotations

import torch

from ._triton import (HAS_TRITON, capability, cdiv, next_pow2, num_sms, pdl_kwargs, tl, triton, use_pdl, use_triton,
                      workspace)

if HAS_TRITON:
    from ._triton import (conv_load, conv_rows, emit_rows, fold_rstd, pdl_launch_dependents, pdl_wait,
                          splitk_finish)

__all__ = [
    "TILE_ROWS",
    "q4_dequantize",
    "q4_gemv",
    "q4_gemv_fold",
    "q4_gemv_fold_ref",
    "q4_gemv_ref",
    "q4_gemv_silu_mul",
    "q4_gemv_silu_mul_ref",
    "q4_gemv_silu_mul_triton",
    "q4_gemv_triton",
    "q4_tile",
    "q4_untile",
]


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def q4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                  tiled: bool = False) -> torch.Tensor:
    """Packed q4 weight (standard or tiled layout) -> fp32 [N, K]."""
    if tiled:
        qweight, scales, mins = q4_untile(qweight, scales, mins, group_size)
    n, kb = qweight.shape
    g = group_size
    k = kb * 2
    if k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    packed = qweight.reshape(n, k // g, g // 2)
    q = torch.cat([packed & 0xF, packed >> 4], dim=2).to(torch.float32)  # [N, K/G, G]
    w = q * scales.to(torch.float32).unsqueeze(2) + mins.to(torch.float32).unsqueeze(2)
    return w.reshape(n, k)


TILE_ROWS = 64  # rows per slab of the tiled layout


def q4_tile(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard -> tiled layout (see the module docstring); N must be a multiple of TILE_ROWS."""
    return _retile(qweight, scales, mins, group_size, True)


def q4_untile(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled -> standard layout (the inverse of q4_tile)."""
    return _retile(qweight, scales, mins, group_size, False)


def _retile(qweight, scales, mins, group_size, to_tiled: bool):
    n, kb = qweight.shape
    ngr = 2 * kb // group_size
    if n % TILE_ROWS or tuple(scales.shape) != (n, ngr) or tuple(mins.shape) != (n, ngr):
        raise ValueError(f"q4 tiling needs rows a multiple of {TILE_ROWS}: qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, mins {tuple(mins.shape)}")

    def swap(t: torch.Tensor, c: int) -> torch.Tensor:
        a, b = (TILE_ROWS, ngr) if to_tiled else (ngr, TILE_ROWS)
        return t.reshape(n // TILE_ROWS, a, b, c).transpose(1, 2).reshape(n, ngr * c).contiguous()

    return swap(qweight, group_size // 2), swap(scales, 1), swap(mins, 1)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _finish(y: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 1:
        y = y.squeeze(0)
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


def _rstd(rstd: tuple | None, k: int) -> float | torch.Tensor:
    """The consumer side of a folded norm: rsqrt(sum of the producer's row-block sums / K + eps)."""
    if rstd is None:
        return 1.0
    ss, eps = rstd
    return torch.rsqrt(ss.to(torch.float32).sum() / k + eps)


def q4_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    tiled: bool = False,
    rstd: tuple | None = None,
) -> torch.Tensor:
    """y = x @ W.T with W dequantized in fp32; result in x.dtype. rstd = (ss, eps): the consumer of a
    folded norm (see q4_gemv_fold): y is scaled by rsqrt(sum(ss) / K + eps) before the rounding."""
    w = q4_dequantize(qweight, scales, mins, group_size, tiled)
    y = (_as_rows(x).to(torch.float32) @ w.T) * _rstd(rstd, w.shape[1])
    return _finish(y, x, out)


def q4_gemv_fold_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     group_size: int, residual: torch.Tensor, w: torch.Tensor | None = None,
                     tiled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The producer of a folded norm: y = x @ W.T (rounded to x.dtype), x_new = residual + y (rounded to
    residual.dtype); with the norm weight w also x~ = x_new * w (x.dtype) and ss, the sum of x_new^2 (one
    or more partial sums). The norm's consumer then computes rmsnorm(x_new) * w @ W2.T as
    q4_gemv(x~, W2, rstd=(ss, eps)): the pre-norm without its own launch."""
    y = q4_gemv_ref(x, qweight, scales, mins, group_size, tiled=tiled)
    xn = (residual.to(torch.float32) + y.to(torch.float32).reshape(residual.shape)).to(residual.dtype)
    if w is None:
        return xn, None, None
    return fold_outputs(xn, w, x.dtype)


def fold_outputs(x: torch.Tensor, w: torch.Tensor, xt_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The producer side of a folded RMSNorm for a formed row x: (x, x~ = x * w in xt_dtype (default x's),
    the sum of x^2 as a [1] fp32 tensor); the consumer scales by rsqrt(sum / K + eps)."""
    xf = x.to(torch.float32)
    return x, (xf * w.to(torch.float32)).to(xt_dtype or x.dtype), xf.pow(2).sum().reshape(1)


def q4_gemv_silu_mul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    tiled: bool = False,
    rstd: tuple | None = None,
) -> torch.Tensor:
    """For a merged gate|up weight [2I, K]: silu(x @ Wg.T) * (x @ Wu.T), fp32 math, x.dtype result
    (rstd: as q4_gemv_ref, applied before the SiLU)."""
    w = q4_dequantize(qweight, scales, mins, group_size, tiled)
    y = (_as_rows(x).to(torch.float32) @ w.T) * _rstd(rstd, w.shape[1])
    i = w.shape[0] // 2
    y = torch.nn.functional.silu(y[:, :i]) * y[:, i:]
    return _finish(y, x, out)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _nibble(w, magic, k: tl.constexpr):
        """Nibble k (bits 4k..4k+3) of int32 words as the float 1 + q/128 (q in mantissa bits 16..19).

        Bit tricks instead of int->float conversions (I2F runs at a quarter of the FMA rate).
        `magic` = 0x3F800000 arrives as a kernel argument: as a register operand it lets ptxas emit
        one LOP3 with the mask as immediate (two immediates made it re-materialise a constant)."""
        if k < 4:
            v = w << (16 - 4 * k)
        elif k > 4:
            v = w >> (4 * k - 16)
        else:
            v = w
        return ((v & 0xF0000) | magic).to(tl.float32, bitcast=True)

    # --- packed bf16x2 path (bf16 x): two weights per instruction ---------------------------------
    # A word's 8 nibbles become four bf16x2 pairs with one shift and one LOP3 each:
    #   (w >> 4j) & 0x000F000F | 0x43004300  ==  bf16x2 (128 + q_lo, 128 + q_hi),
    # minus 136 (exact) gives q - 8 in -8..7, multiplied with the matching x pair by fma.rn.bf16x2.
    # Shift 0 pairs columns (4m, 4m+2), 4: (H+4m, H+4m+2), 8: (4m+1, 4m+3), 12: (H+4m+1, H+4m+3)
    # (H = G/2), so x is regrouped into those pairs once per thread and group (one PRMT each) and
    # reused for all rows the thread owns. Each bf16 lane sums 4 products (relative error ~3e-3 of
    # the result, ~1.5x bf16 output rounding), then the two lanes go to fp32.
    # On the GPU these are inline PTX; in the interpreter the same functions are emulated in fp32.
    @triton.jit
    def _pair(a, b, HIGH: tl.constexpr, ASM: tl.constexpr):
        """bf16x2 (lo16(a), lo16(b)) or, with HIGH, (hi16(a), hi16(b)); a, b int32 words of bf16 pairs."""
        if ASM:
            if HIGH:
                return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b],
                                             dtype=tl.int32, is_pure=True, pack=1)
        if HIGH:
            return ((a >> 16) & 0xFFFF) | (b & -65536)
        return (a & 0xFFFF) | (b << 16)

    @triton.jit
    def _lanes(p):
        """int32 holding bf16x2 -> (lo, hi) as fp32."""
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _xpair(j: tl.constexpr, x0, x1, x2, x3):
        """The x pair that goes with nibble shift 4j (interpreter emulations)."""
        if j == 0:
            return x0
        elif j == 1:
            return x1
        elif j == 2:
            return x2
        return x3

    @triton.jit
    def _word_dot(w, x0, x1, x2, x3, ASM: tl.constexpr):
        """sum over the 8 nibbles q of word w of (q - 8) * x, as fp32 (x0..x3: the bf16x2 pairs)."""
        if ASM:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 m, c, k, one, t, h0, h1, h2, h3, acc;
                mov.b32 m, 0x000F000F;
                mov.b32 c, 0x43004300;
                mov.b32 k, 0xC308C308;
                mov.b32 one, 0x3F803F80;
                lop3.b32 h0, $1, m, c, 0xEA;
                shr.u32 t, $1, 4;
                lop3.b32 h1, t, m, c, 0xEA;
                shr.u32 t, $1, 8;
                lop3.b32 h2, t, m, c, 0xEA;
                shr.u32 t, $1, 12;
                lop3.b32 h3, t, m, c, 0xEA;
                fma.rn.bf16x2 h0, h0, one, k;
                fma.rn.bf16x2 h1, h1, one, k;
                fma.rn.bf16x2 h2, h2, one, k;
                fma.rn.bf16x2 h3, h3, one, k;
                mul.rn.bf16x2 acc, h0, $2;
                fma.rn.bf16x2 acc, h1, $3, acc;
                fma.rn.bf16x2 acc, h2, $4, acc;
                fma.rn.bf16x2 acc, h3, $5, acc;
                shl.b32 t, acc, 16;
                and.b32 acc, acc, 0xFFFF0000;
                add.f32 $0, t, acc;
                }""",
                "=r,r,r,r,r,r", [w, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)
        r = tl.zeros(w.shape, dtype=tl.float32)
        for j in tl.static_range(4):
            xl, xh = _lanes(_xpair(j, x0, x1, x2, x3))
            ql = ((w >> (4 * j)) & 0xF).to(tl.float32) - 8.0
            qh = ((w >> (16 + 4 * j)) & 0xF).to(tl.float32) - 8.0
            r = r + ql * xl + qh * xh
        return r

    @triton.jit
    def _pair_sum(x0, x1, x2, x3, ASM: tl.constexpr):
        """Sum of the 8 bf16 values in four bf16x2 pairs, as fp32 (bf16x2 adds on the GPU)."""
        if ASM:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 one, s, t;
                mov.b32 one, 0x3F803F80;
                fma.rn.bf16x2 s, $1, one, $2;
                fma.rn.bf16x2 s, $3, one, s;
                fma.rn.bf16x2 s, $4, one, s;
                shl.b32 t, s, 16;
                and.b32 s, s, 0xFFFF0000;
                add.f32 $0, t, s;
                }""",
                "=r,r,r,r,r", [x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)
        a0, a1 = _lanes(x0)
        b0, b1 = _lanes(x1)
        c0, c1 = _lanes(x2)
        d0, d1 = _lanes(x3)
        return ((a0 + a1) + (b0 + b1)) + ((c0 + c1) + (d0 + d1))

    # --- tensor-core path (bf16 x, one row of x) ----------------------------------------------------
    # mma.m16n8k16 (bf16 in, fp32 accumulate) on the nibble floats 128 + q, which (w >> s) & 0x000F000F
    # | 0x43004300 builds two at a time. The K order inside the mma is a permutation of the group's
    # columns applied to both operands (a dot product does not care): lane c (= lane % 4) holds words
    # 4c..4c+3 of a row's group (Triton's [1,4] x [8,4] tile), and at word t its shifts 0/8 give the
    # A-fragment registers a0/a2 of one k-tile (low nibbles), shifts 4/12 those of a second (high
    # nibbles); the matching x pairs are the bf16x2 pairs of the packed path. Every B column holds x,
    # so each lane receives the full 32-column sums of its two rows (rows r and r + BN/2 of the
    # program); the four lanes of a row hold the same sums, so the row total is divided by 4. A second
    # pair of MMAs with A = 1.0 gives sum(x) over the same columns for the min term:
    #   s * sum q x + m * sum x = s * D_w + (m - 128 s) * D_1.
    # Products of bf16 are exact in fp32: as precise as the fp32 path, ~1.9 instructions per weight.
    @triton.jit
    def _mma_word(wa, wb, x0, x1, x2, x3, ASM: tl.constexpr):
        """(D_w row A, D_w row B, D_1) over the 32 columns of word t (see above), as fp32."""
        if ASM:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 m, c, one, t, a0, a1, a2, a3, z;
                .reg .f32 d0, d1, d2, d3, e0, e1, e2, e3;
                mov.b32 m, 0x000F000F;
                mov.b32 c, 0x43004300;
                mov.b32 one, 0x3F803F80;
                mov.b32 z, 0;
                lop3.b32 a0, $3, m, c, 0xEA;
                lop3.b32 a1, $4, m, c, 0xEA;
                shr.u32 t, $3, 8;
                lop3.b32 a2, t, m, c, 0xEA;
                shr.u32 t, $4, 8;
                lop3.b32 a3, t, m, c, 0xEA;
                mov.f32 d0, 0f00000000; mov.f32 d1, 0f00000000; mov.f32 d2, 0f00000000; mov.f32 d3, 0f00000000;
                mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0, d1, d2, d3}, {a0, a1, a2, a3}, {$5, $7}, {d0, d1, d2, d3};
                shr.u32 t, $3, 4;
                lop3.b32 a0, t, m, c, 0xEA;
                shr.u32 t, $4, 4;
                lop3.b32 a1, t, m, c, 0xEA;
                shr.u32 t, $3, 12;
                lop3.b32 a2, t, m, c, 0xEA;
                shr.u32 t, $4, 12;
                lop3.b32 a3, t, m, c, 0xEA;
                mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0, d1, d2, d3}, {a0, a1, a2, a3}, {$6, $8}, {d0, d1, d2, d3};
                mov.f32 e0, 0f00000000; mov.f32 e1, 0f00000000; mov.f32 e2, 0f00000000; mov.f32 e3, 0f00000000;
                mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {e0, e1, e2, e3}, {one, one, one, one}, {$5, $7}, {e0, e1, e2, e3};
                mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {e0, e1, e2, e3}, {one, one, one, one}, {$6, $8}, {e0, e1, e2, e3};
                mov.b32 $0, d0;
                mov.b32 $1, d2;
                mov.b32 $2, e0;
                }""",
                "=r,=r,=r,r,r,r,r,r,r", [wa, wb, x0, x1, x2, x3],
                dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        # interpreter: this lane's own 8 columns only, times 4 (the MMA gives every lane of a row the
        # sum over all four lanes; the row total divides by 4 either way)
        da = tl.zeros(wa.shape, dtype=tl.float32)
        db = tl.zeros(wa.shape, dtype=tl.float32)
        d1 = tl.zeros(wa.shape, dtype=tl.float32)
        for j in tl.static_range(4):
            xl, xh = _lanes(_xpair(j, x0, x1, x2, x3))
            da = da + (128.0 + ((wa >> (4 * j)) & 0xF).to(tl.float32)) * xl
            da = da + (128.0 + ((wa >> (16 + 4 * j)) & 0xF).to(tl.float32)) * xh
            db = db + (128.0 + ((wb >> (4 * j)) & 0xF).to(tl.float32)) * xl
            db = db + (128.0 + ((wb >> (16 + 4 * j)) & 0xF).to(tl.float32)) * xh
            d1 = d1 + xl + xh
        return 4.0 * da, 4.0 * db, 4.0 * d1

    @triton.jit
    def _row_offsets(r, NGR, HW: tl.constexpr, TR: tl.constexpr):
        """(word offset, scale offset) of group 0 of rows r in the standard layout (TR = 0) or the tiled
        one (q4_tile: slabs of TR rows stored group-major; group g then adds g * TR * HW words, g * TR
        scales instead of g * HW, g)."""
        if TR:
            return (r // TR) * (TR * NGR * HW) + (r % TR) * HW, (r // TR) * (TR * NGR) + r % TR
        return r * (NGR * HW), r * NGR

    @triton.jit
    def _mma_load(w_ptr, s_ptr, m_ptr, rows_a, half, lim_a, lim_b, NGR, g, HW: tl.constexpr,
                  TR: tl.constexpr):
        """Words and (scale, min) of group g for rows_a and rows_a + half; rows at or past lim_* read 0."""
        mw = tl.arange(0, HW)[None, :]
        mask_a = rows_a < lim_a
        mask_b = rows_a + half < lim_b
        if TR:
            wg = TR * HW
            sg = TR
        else:
            wg = HW
            sg = 1
        wo_a, so_a = _row_offsets(rows_a, NGR, HW, TR)
        wo_b, so_b = _row_offsets(rows_a + half, NGR, HW, TR)
        wa = tl.load(w_ptr + wo_a[:, None] + g * wg + mw, mask=mask_a[:, None], other=0)
        wb = tl.load(w_ptr + wo_b[:, None] + g * wg + mw, mask=mask_b[:, None], other=0)
        sa = tl.load(s_ptr + so_a + g * sg, mask=mask_a, other=0)
        ma = tl.load(m_ptr + so_a + g * sg, mask=mask_a, other=0)
        sb = tl.load(s_ptr + so_b + g * sg, mask=mask_b, other=0)
        mb = tl.load(m_ptr + so_b + g * sg, mask=mask_b, other=0)
        return wa, wb, sa, ma, sb, mb

    @triton.jit
    def _mma_acc(acc_a, acc_b, wa, wb, sa, ma, sb, mb, x0, x1, x2, x3, ASM: tl.constexpr):
        da, db, d1 = _mma_word(wa, wb, x0, x1, x2, x3, ASM)
        sa = sa.to(tl.float32)[:, None]
        sb = sb.to(tl.float32)[:, None]
        acc_a = acc_a + sa * da + (ma.to(tl.float32)[:, None] - 128.0 * sa) * d1
        acc_b = acc_b + sb * db + (mb.to(tl.float32)[:, None] - 128.0 * sb) * d1
        return acc_a, acc_b

    @triton.jit
    def _x_pairs(xa, xc, xd, xe, ASM: tl.constexpr):
        """A group's x words as the four bf16x2 MMA operands (x0..x3 of _mma_word), as [1, HW] rows."""
        return (_pair(xa, xc, False, ASM)[None, :], _pair(xd, xe, False, ASM)[None, :],
                _pair(xa, xc, True, ASM)[None, :], _pair(xd, xe, True, ASM)[None, :])

    @triton.jit
    def _x_words(x_ptr, g, hw, G: tl.constexpr):
        xb = x_ptr + g * (G // 2) + 2 * hw
        return tl.load(xb), tl.load(xb + 1), tl.load(xb + G // 4), tl.load(xb + G // 4 + 1)

    @triton.jit
    def _scale_words(w, r, ASM: tl.constexpr):
        """bf16 pairs (int32 words) times the fp32 scalar r, rounded back to bf16 pairs."""
        lo = (w << 16).to(tl.float32, bitcast=True) * r
        hi = (w & -65536).to(tl.float32, bitcast=True) * r
        if ASM:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.int32,
                                             is_pure=True, pack=1)
        lb = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hb = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        return lb | (hb << 16)

    @triton.jit
    def _head_rstd(hs_ptr, h, NVB: tl.constexpr, DV, eps):
        """rsqrt(mean of squares + eps) of head h from its NVB partial sums of squares (NVB scalar loads:
        no reduction across lanes, so no barrier in the GEMV loop)."""
        s = tl.load(hs_ptr + h * NVB)
        for j in tl.static_range(1, NVB):
            s += tl.load(hs_ptr + h * NVB + j)
        return 1.0 / tl.sqrt(s / DV + eps)

    @triton.jit
    def _x_pairs_hn(xa, xc, xd, xe, g, G: tl.constexpr, ASM: tl.constexpr, HEADNORM: tl.constexpr, hs_ptr,
                    NVB: tl.constexpr, DV, eps_h, hb, r0, r1, r2, r3):
        """_x_pairs of group g; HEADNORM: x is a per-head normed vector without its rstd (the GDN step's
        x~ = o * w * silu(z)), each group half (xa, xc: its first G/2 values, xd, xe: the rest; DV a multiple
        of G/2, so each half lies in one head) scaled by its head's rstd first: 1 loads the head's partial
        sums here, 2 picks it from the rstds r0..r3 of heads hb..hb+3 (the program's heads, loaded once)."""
        if HEADNORM > 0:
            h_lo = (g * G) // DV
            h_hi = (g * G + G // 2) // DV
            if HEADNORM == 1:
                r_lo = _head_rstd(hs_ptr, h_lo, NVB, DV, eps_h)
                r_hi = _head_rstd(hs_ptr, h_hi, NVB, DV, eps_h)
            else:
                i_lo = h_lo - hb
                i_hi = h_hi - hb
                r_lo = tl.where(i_lo == 0, r0, tl.where(i_lo == 1, r1, tl.where(i_lo == 2, r2, r3)))
                r_hi = tl.where(i_hi == 0, r0, tl.where(i_hi == 1, r1, tl.where(i_hi == 2, r2, r3)))
            xa = _scale_words(xa, r_lo, ASM)
            xc = _scale_words(xc, r_lo, ASM)
            xd = _scale_words(xd, r_hi, ASM)
            xe = _scale_words(xe, r_hi, ASM)
        return _x_pairs(xa, xc, xd, xe, ASM)

    @triton.jit
    def _q4_mma_body(x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, part_ptr, cnt_ptr, NR, NGR, stride_y, GPS, SPLIT,
                     G: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr,
                     ASM: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr, TR: tl.constexpr,
                     STAGES: tl.constexpr, GHALF: tl.constexpr, PF2: tl.constexpr, SPLITP: tl.constexpr,
                     rss_ptr, NSS, eps_r, RSTD: tl.constexpr, NSSP: tl.constexpr, FOLD: tl.constexpr,
                     res_ptr, fw_ptr, xt_ptr, ss_ptr, FPRE: tl.constexpr, PW2: tl.constexpr,
                     CONV: tl.constexpr, cw_ptr, cs_ptr, act_ptr, NCONV, KC: tl.constexpr, KP: tl.constexpr,
                     HEADNORM: tl.constexpr, hs_ptr, NVB: tl.constexpr, DV, eps_h,
                     RSUM: tl.constexpr, rsum_ptr, NQS, NKS):
        """Tile A holds rows r, tile B rows r + OFFB: r + BN/2 (BN output rows per program), or with
        GATED and GHALF the matching up rows r + NR (BN/2 gate rows and their BN/2 up rows per program:
        two tiles instead of four, half the registers, twice the programs). Otherwise GATED adds the up
        rows of both tiles (tiles U, V).
        RSTD (the consumer of a folded norm): the rows are scaled by rsqrt(sum(rss[:NSS]) / K + eps_r),
        from the producer's row-block sums loaded beside x; FOLD (the producer, split-K only): the
        finished rows go to the residual stream by fold_store instead of y; FPRE: every program loads its
        row block's norm weight before the wait and residual rows after it (a few hundred bytes, L2), so
        that the last program's tail after the split-K atomic does not wait for them. CONV: rows below NCONV
        also go through a short conv + SiLU (conv_rows: act_ptr, the conv state updated); HEADNORM: x is
        scaled per head as it is paired (_x_pairs_hn)."""
        HW: tl.constexpr = G // 8
        HALF: tl.constexpr = BN // 2
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        if GATED and GHALF:
            rows_a = pid_n * HALF + tl.arange(0, HALF)
            OFFB = NR
            LB = NR  # tile B's row limit is NR + LB (row r + OFFB exists iff r < NR)
            mask_b = rows_a < NR
        else:
            rows_a = pid_n * BN + tl.arange(0, HALF)
            OFFB = HALF
            LB = 0
            mask_b = rows_a + HALF < NR
        mask_a = rows_a < NR
        QUAD: tl.constexpr = GATED and not GHALF  # four tiles per group
        hw = tl.arange(0, HW)
        ga = tl.zeros([HALF, HW], dtype=tl.float32)
        gb = tl.zeros([HALF, HW], dtype=tl.float32)
        ua = tl.zeros([HALF, HW], dtype=tl.float32)
        ub = tl.zeros([HALF, HW], dtype=tl.float32)
        g_begin = pid_k * GPS
        g_end = tl.minimum(g_begin + GPS, NGR)
        # PREFETCH: group g+1's words, scales and x are loaded before group g's math (two groups of
        # loads in flight per warp); the loads past the split's end are masked off (limit 0)
        lim = tl.where(g_begin < g_end, NR, 0)
        n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, OFFB, lim, lim + LB,
                                                       NGR, g_begin, HW, TR)
        if QUAD:
            n_ua, n_ub, n_usa, n_uma, n_usb, n_umb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a + NR, HALF, lim + NR,
                                                               lim + NR, NGR, g_begin, HW, TR)
        else:
            n_ua, n_ub, n_usa, n_uma, n_usb, n_umb = n_wa, n_wb, n_sa, n_ma, n_sb, n_mb
        if PF2 or PW2:  # PF2: two groups ahead (two tiles only); PW2: the second group before the wait only
            lim = tl.where(g_begin + 1 < g_end, NR, 0)
            p_wa, p_wb, p_sa, p_ma, p_sb, p_mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, OFFB, lim, lim + LB,
                                                           NGR, g_begin + 1, HW, TR)
        else:
            p_wa, p_wb, p_sa, p_ma, p_sb, p_mb = n_wa, n_wb, n_sa, n_ma, n_sb, n_mb
        # weights and scales are written by no kernel: loaded before waiting for the previous kernel
        # (programmatic dependent launch), x and the workspaces after
        PRE: tl.constexpr = FPRE and FOLD > 0 and SPLIT_K and not GATED
        r_pre = 0.0
        w_pre = 0.0
        if PRE:
            rn_f = pid_n * BN + tl.arange(0, BN)
            if FOLD == 2:
                w_pre = tl.load(fw_ptr + rn_f, mask=rn_f < NR, other=0)
        pdl_wait(USE_PDL)
        if PRE:
            r_pre = tl.load(res_ptr + rn_f, mask=rn_f < NR, other=0)
        rstd = 1.0
        if RSTD:
            rstd = fold_rstd(rss_ptr, NSS, NSSP, NGR * G, eps_r)
        n_xa, n_xc, n_xd, n_xe = _x_words(x_ptr, tl.minimum(g_begin, NGR - 1), hw, G)
        p_xa, p_xc, p_xd, p_xe = _x_words(x_ptr, tl.minimum(g_begin + 1, NGR - 1), hw, G)
        hb = (g_begin * G) // DV
        r0 = 1.0
        r1 = 1.0
        r2 = 1.0
        r3 = 1.0
        if HEADNORM == 2:  # the rstds of the (at most four) heads this program's groups touch
            nh_last = (NGR * G) // DV - 1
            r0 = _head_rstd(hs_ptr, tl.minimum(hb, nh_last), NVB, DV, eps_h)
            r1 = _head_rstd(hs_ptr, tl.minimum(hb + 1, nh_last), NVB, DV, eps_h)
            r2 = _head_rstd(hs_ptr, tl.minimum(hb + 2, nh_last), NVB, DV, eps_h)
            r3 = _head_rstd(hs_ptr, tl.minimum(hb + 3, nh_last), NVB, DV, eps_h)
        g_start = g_begin
        if PW2:  # the first group, peeled: the second one's loads went out before the wait, so the loop
            # (which loads one group ahead) starts at the second group with its third in flight
            wa, wb, sa, ma, sb, mb = n_wa, n_wb, n_sa, n_ma, n_sb, n_mb
            xa, xc, xd, xe = n_xa, n_xc, n_xd, n_xe
            n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = p_wa, p_wb, p_sa, p_ma, p_sb, p_mb
            n_xa, n_xc, n_xd, n_xe = p_xa, p_xc, p_xd, p_xe
            x0, x1, x2, x3 = _x_pairs_hn(xa, xc, xd, xe, g_begin, G, ASM, HEADNORM, hs_ptr, NVB, DV, eps_h, hb,
                                         r0, r1, r2, r3)
            ga, gb = _mma_acc(ga, gb, wa, wb, sa, ma, sb, mb, x0, x1, x2, x3, ASM)
            g_start = g_begin + 1
        # STAGES > 1 (with PREFETCH off): Triton's software pipeliner copies the weights and x of the
        # next STAGES - 1 groups into shared memory (cp.async) while this group is computed
        for g in tl.range(g_start, g_end, num_stages=STAGES):
            if PREFETCH:
                wa, wb, sa, ma, sb, mb = n_wa, n_wb, n_sa, n_ma, n_sb, n_mb
                ua_w, ub_w, usa, uma, usb, umb = n_ua, n_ub, n_usa, n_uma, n_usb, n_umb
                xa, xc, xd, xe = n_xa, n_xc, n_xd, n_xe
                if PF2:
                    n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = p_wa, p_wb, p_sa, p_ma, p_sb, p_mb
                    n_xa, n_xc, n_xd, n_xe = p_xa, p_xc, p_xd, p_xe
                    lim = tl.where(g + 2 < g_end, NR, 0)
                    p_wa, p_wb, p_sa, p_ma, p_sb, p_mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, OFFB, lim,
                                                                   lim + LB, NGR, g + 2, HW, TR)
                    p_xa, p_xc, p_xd, p_xe = _x_words(x_ptr, tl.minimum(g + 2, g_end - 1), hw, G)
                else:
                    lim = tl.where(g + 1 < g_end, NR, 0)
                    n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, OFFB, lim,
                                                                   lim + LB, NGR, g + 1, HW, TR)
                    if QUAD:
                        n_ua, n_ub, n_usa, n_uma, n_usb, n_umb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a + NR,
                                                                           HALF, lim + NR, lim + NR, NGR, g + 1,
                                                                           HW, TR)
                    n_xa, n_xc, n_xd, n_xe = _x_words(x_ptr, tl.minimum(g + 1, g_end - 1), hw, G)
            else:
                wa, wb, sa, ma, sb, mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, OFFB, NR, NR + LB, NGR,
                                                   g, HW, TR)
                if QUAD:
                    ua_w, ub_w, usa, uma, usb, umb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a + NR, HALF, 2 * NR,
                                                               2 * NR, NGR, g, HW, TR)
                xa, xc, xd, xe = _x_words(x_ptr, g, hw, G)
            x0, x1, x2, x3 = _x_pairs_hn(xa, xc, xd, xe, g, G, ASM, HEADNORM, hs_ptr, NVB, DV, eps_h, hb, r0, r1,
                                         r2, r3)
            ga, gb = _mma_acc(ga, gb, wa, wb, sa, ma, sb, mb, x0, x1, x2, x3, ASM)
            if QUAD:  # the matching up-projection rows
                ua, ub = _mma_acc(ua, ub, ua_w, ub_w, usa, uma, usb, umb, x0, x1, x2, x3, ASM)
        sc = 0.25  # the MMA gives every lane of a row the row's sum: four copies
        if not SPLIT_K:
            sc = sc * rstd  # split-K scales the finished sums instead (the partials stay unscaled)
        if GATED and GHALF:  # tile A: gate rows, tile B: their up rows
            emit_rows(y_ptr, part_ptr, tl.sum(ga, 1) * sc, tl.sum(gb, 1) * sc, 0, pid_k, rows_a, mask_a, NR,
                      stride_y, 1, SPLIT_K, GATED)
            if SPLIT_K:
                rn = pid_n * HALF + tl.arange(0, HALF)
                splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rn < NR, NR, stride_y, 1, HALF, SPLIT, GATED,
                              SPLITP, rstd)
        else:
            emit_rows(y_ptr, part_ptr, tl.sum(ga, 1) * sc, tl.sum(ua, 1) * sc, 0, pid_k, rows_a, mask_a, NR,
                      stride_y, 1, SPLIT_K, GATED)
            emit_rows(y_ptr, part_ptr, tl.sum(gb, 1) * sc, tl.sum(ub, 1) * sc, 0, pid_k, rows_a + HALF,
                      mask_b, NR, stride_y, 1, SPLIT_K, GATED)
            if SPLIT_K:
                rn = pid_n * BN + tl.arange(0, BN)
                splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rn < NR, NR, stride_y, 1, BN, SPLIT, GATED,
                              SPLITP, rstd, FOLD, res_ptr, fw_ptr, xt_ptr, ss_ptr, r_pre, w_pre, PRE,
                              CONV, cw_ptr, cs_ptr, act_ptr, NCONV, KC, KP, RSUM, rsum_ptr, NQS, NKS)
            elif CONV:  # one split: the rows as emit_rows stored them
                ty = y_ptr.dtype.element_ty
                c_w, c_old, c_nxt = conv_load(rows_a, mask_a, cw_ptr, cs_ptr, NCONV, KC, KP)
                conv_rows((tl.sum(ga, 1) * sc).to(ty).to(tl.float32), rows_a, mask_a, c_w, c_old, c_nxt, cs_ptr,
                          act_ptr, NCONV, KC, KP)
                c_w, c_old, c_nxt = conv_load(rows_a + HALF, mask_b, cw_ptr, cs_ptr, NCONV, KC, KP)
                conv_rows((tl.sum(gb, 1) * sc).to(ty).to(tl.float32), rows_a + HALF, mask_b, c_w, c_old, c_nxt,
                          cs_ptr, act_ptr, NCONV, KC, KP)

    @triton.jit
    def _q4_group(acc, w, s, m, x_row, gx, mcol, magic, G: tl.constexpr, X_BF16: tl.constexpr,
                  ASM: tl.constexpr, PAIRS: tl.constexpr):
        """acc += s * sum q x + m * sum x for each word column (elementwise, reduced after the loop).

        w [BN, GPI, G/8] int32 words: [r, i, c] is word mcol[i, c] of group gx[i, c] (GPI consecutive
        groups); word m, byte j: low nibble <-> x[g*G + 4m + j], high nibble <-> x[g*G + G/2 + 4m + j].
        s, m: [BN, GPI, 1] fp32 scale and min of each group."""
        if X_BF16:  # x_row: int32 view of a bf16 row, two bf16 per load
            xb = x_row + gx * (G // 2) + 2 * mcol
            if PAIRS:  # packed bf16x2 math (see above)
                xa = tl.load(xb)                   # x[4m], x[4m+1]
                xc = tl.load(xb + 1)               # x[4m+2], x[4m+3]
                xd = tl.load(xb + G // 4)          # x[H+4m], x[H+4m+1]
                xe = tl.load(xb + G // 4 + 1)      # x[H+4m+2], x[H+4m+3]
                x0 = _pair(xa, xc, False, ASM)[None, :, :]
                x2 = _pair(xa, xc, True, ASM)[None, :, :]
                x1 = _pair(xd, xe, False, ASM)[None, :, :]
                x3 = _pair(xd, xe, True, ASM)[None, :, :]
                xsum = _pair_sum(x0, x1, x2, x3, ASM)
                t = _word_dot(w, x0, x1, x2, x3, ASM)  # sum (q - 8) x
                return acc + s * t + (m + 8.0 * s) * xsum
            # fp32 math: nibble -> 1 + q/128 (see _nibble), sum f x = sum x + sum q x / 128
            t = tl.zeros_like(acc)
            xsum = tl.zeros(mcol.shape, dtype=tl.float32)
            for half in tl.static_range(2):  # low / high nibbles
                for p in tl.static_range(2):  # bytes j = 2p, 2p + 1
                    xp = tl.load(xb + half * (G // 4) + p)
                    x0 = (xp << 16).to(tl.float32, bitcast=True)
                    x1 = (xp & -65536).to(tl.float32, bitcast=True)
                    t = t + _nibble(w, magic, 4 * p + half) * x0[None, :, :]
                    t = t + _nibble(w, magic, 4 * p + 2 + half) * x1[None, :, :]
                    xsum = xsum + x0 + x1
        else:  # fp16 / fp32 x, same fp32 math
            t = tl.zeros_like(acc)
            xsum = tl.zeros(mcol.shape, dtype=tl.float32)
            xb = x_row + gx * G + 4 * mcol
            for half in tl.static_range(2):
                for j in tl.static_range(4):
                    xv = tl.load(xb + half * (G // 2) + j).to(tl.float32)
                    t = t + _nibble(w, magic, 2 * j + half) * xv[None, :, :]
                    xsum = xsum + xv
        s128 = 128.0 * s
        acc = acc + s128 * t
        return acc + (m - s128) * xsum[None, :, :]

    @triton.jit
    def _q4_rows(a0, a1, a2, a3, a4, a5, a6, a7, w, s, m, x_ptr, stride_x, gx, mcol, magic,
                 T: tl.constexpr, G: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr):
        """One group for each of the T rows of x (one accumulator per row: Triton unrolls at compile
        time, so the T accumulators are named; the unused ones are dropped)."""
        a0 = _q4_group(a0, w, s, m, x_ptr, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 1:
            a1 = _q4_group(a1, w, s, m, x_ptr + stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 2:
            a2 = _q4_group(a2, w, s, m, x_ptr + 2 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 3:
            a3 = _q4_group(a3, w, s, m, x_ptr + 3 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 4:
            a4 = _q4_group(a4, w, s, m, x_ptr + 4 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 5:
            a5 = _q4_group(a5, w, s, m, x_ptr + 5 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 6:
            a6 = _q4_group(a6, w, s, m, x_ptr + 6 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        if T > 7:
            a7 = _q4_group(a7, w, s, m, x_ptr + 7 * stride_x, gx, mcol, magic, G, X_BF16, ASM, PAIRS)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _emit_tile(y_ptr, part_ptr, a, b, t: tl.constexpr, pid_k, rn, rmask, NR, stride_y,
                   T: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
        """Row t from the [BN, GPI, G/8] accumulators of the fp32 path (reduced once, after the loop)."""
        emit_rows(y_ptr, part_ptr, tl.sum(tl.sum(a, 2), 1), tl.sum(tl.sum(b, 2), 1), t, pid_k, rn, rmask, NR,
                  stride_y, T, SPLIT_K, GATED)

    @triton.jit
    def _dense_rows(x_ptr, wd_ptr, d_ptr, ND, NB, KW, SPLIT, USE_PDL: tl.constexpr, BKW: tl.constexpr,
                    rss_ptr, NSS, eps_r, RSTD: tl.constexpr, NSSP: tl.constexpr, K):
        """One dense bf16 row of the same x per program (d[e] = x . Wd[e] in fp32, times a folded norm's
        rstd): rows e = (pid_n - NB) * SPLIT + pid_k < ND. The row's words load before the PDL wait."""
        e = (tl.program_id(1) - NB) * SPLIT + tl.program_id(0)
        if e < ND:
            kw = tl.arange(0, BKW)
            mk = kw < KW
            w = tl.load(wd_ptr + e * KW + kw, mask=mk, other=0)
            pdl_wait(USE_PDL)
            xw = tl.load(x_ptr + kw, mask=mk, other=0)
            # bf16 pairs: the low half's bits << 16 and the high half's bits are the fp32 values
            w_lo = (w << 16).to(tl.float32, bitcast=True)
            w_hi = (w & -65536).to(tl.float32, bitcast=True)
            x_lo = (xw << 16).to(tl.float32, bitcast=True)
            x_hi = (xw & -65536).to(tl.float32, bitcast=True)
            acc = tl.sum(w_lo * x_lo + w_hi * x_hi, axis=0)
            if RSTD:
                acc = acc * fold_rstd(rss_ptr, NSS, NSSP, K, eps_r)
            tl.store(d_ptr + e, acc)

    @triton.jit
    def _q4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, part_ptr, cnt_ptr,
        NR,  # output rows (N, or I for the gated variant whose weight has 2*I rows)
        NGR,  # groups per weight row = K // G
        stride_x, stride_y,  # x row stride in x_ptr elements, y row stride
        GPS,  # groups per split
        SPLIT,  # number of splits (run time: one compiled kernel serves every split count)
        MAGIC,  # 0x3F800000 (the float 1.0), passed at run time on purpose: see _nibble
        T: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
        GATED: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr,
        GPI: tl.constexpr, MMA: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr,
        TR: tl.constexpr, STAGES: tl.constexpr, GHALF: tl.constexpr, PF2: tl.constexpr,
        SPLITP: tl.constexpr = 0,  # > 0: split-K partials added by one [SPLITP, BN] load (see splitk_finish)
        rss_ptr=None, NSS=0, eps_r=0.0, RSTD: tl.constexpr = False, NSSP: tl.constexpr = 1,  # folded norm, consumer
        FOLD: tl.constexpr = 0, res_ptr=None, fw_ptr=None, xt_ptr=None, ss_ptr=None,  # folded norm, producer
        FPRE: tl.constexpr = False,  # producer: residual and weight rows loaded at the start (FOLD_PRELOAD)
        PW2: tl.constexpr = False,  # the second group's weights also before the PDL wait (PREWAIT_TWO)
        wd_ptr=None, d_ptr=None, ND=0, NB=0, DENSE: tl.constexpr = False, BKW: tl.constexpr = 1,  # dense rows
        CONV: tl.constexpr = False, cw_ptr=None, cs_ptr=None, act_ptr=None, NCONV=0,  # conv epilogue
        KC: tl.constexpr = 4, KP: tl.constexpr = 4,
        HEADNORM: tl.constexpr = 0, hs_ptr=None, NVB: tl.constexpr = 1, DV=1, eps_h=0.0,  # per-head rstd of x
        RSUM: tl.constexpr = False, rsum_ptr=None, NQS=0, NKS=0,  # row-block sums of squares (row_sums)
    ):
        pdl_launch_dependents(USE_PDL)
        if DENSE and tl.program_id(1) >= NB:  # programs past the q4 row blocks: the dense bf16 rows
            _dense_rows(x_ptr, wd_ptr, d_ptr, ND, NB, NGR * (G // 2), SPLIT, USE_PDL, BKW,
                        rss_ptr, NSS, eps_r, RSTD, NSSP, NGR * G)
        elif MMA:  # tensor cores, T == 1, bf16 x, one group per iteration
            _q4_mma_body(x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, part_ptr, cnt_ptr, NR, NGR, stride_y, GPS, SPLIT,
                         G, BN, SPLIT_K, GATED, ASM, PREFETCH, USE_PDL, TR, STAGES, GHALF, PF2, SPLITP,
                         rss_ptr, NSS, eps_r, RSTD, NSSP, FOLD, res_ptr, fw_ptr, xt_ptr, ss_ptr, FPRE, PW2,
                         CONV, cw_ptr, cs_ptr, act_ptr, NCONV, KC, KP, HEADNORM, hs_ptr, NVB, DV, eps_h,
                         RSUM, rsum_ptr, NQS, NKS)
        else:
            pdl_wait(USE_PDL)
            HW: tl.constexpr = G // 8  # int32 words per group and row
            pid_k = tl.program_id(0)
            pid_n = tl.program_id(1)
            rn = pid_n * BN + tl.arange(0, BN)
            rmask = rn < NR
            # one [BN, HW] accumulator per x row (and per half when gated); unused ones are dropped
            a0 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a1 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a2 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a3 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a4 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a5 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a6 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            a7 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b0 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b1 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b2 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b3 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b4 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b5 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b6 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            b7 = tl.zeros([BN, GPI, HW], dtype=tl.float32)
            g_begin = pid_k * GPS
            g_end = tl.minimum(g_begin + GPS, NGR)
            gi = tl.arange(0, GPI)[:, None]  # [GPI, 1] group within an iteration
            mcol = tl.arange(0, HW)[None, :]  # [1, HW] word within its group
            row_w, row_s = _row_offsets(rn[:, None, None], NGR, HW, TR)
            if TR:  # per-group steps of the tiled layout (see _row_offsets)
                wg = TR * HW
                sg = TR
            else:
                wg = HW
                sg = 1
            rmask3 = rmask[:, None, None]
            for g0 in range(g_begin, g_end, GPI):
                gcol = g0 + gi  # [GPI, 1]
                gx = tl.minimum(gcol, g_end - 1)  # x of a masked group is read in bounds (its s = m = 0)
                ms = rmask3 & (gcol < g_end)[None, :, :]  # [BN, GPI, 1]
                mw = ms & (mcol < HW)[None, :, :]  # [BN, GPI, HW]
                wa = tl.load(qw_ptr + row_w + (gcol * wg + mcol)[None, :, :], mask=mw, other=0)
                sa = tl.load(s_ptr + row_s + (gcol * sg)[None, :, :], mask=ms, other=0).to(tl.float32)
                ma = tl.load(m_ptr + row_s + (gcol * sg)[None, :, :], mask=ms, other=0).to(tl.float32)
                a0, a1, a2, a3, a4, a5, a6, a7 = _q4_rows(a0, a1, a2, a3, a4, a5, a6, a7, wa, sa, ma, x_ptr,
                                                          stride_x, gx, mcol, MAGIC, T, G, X_BF16, ASM, PAIRS)
                if GATED:  # the matching up-projection rows
                    wb = tl.load(qw_ptr + row_w + NR * (NGR * HW) + (gcol * wg + mcol)[None, :, :], mask=mw, other=0)
                    sb = tl.load(s_ptr + row_s + NR * NGR + (gcol * sg)[None, :, :], mask=ms, other=0).to(tl.float32)
                    mb = tl.load(m_ptr + row_s + NR * NGR + (gcol * sg)[None, :, :], mask=ms, other=0).to(tl.float32)
                    b0, b1, b2, b3, b4, b5, b6, b7 = _q4_rows(b0, b1, b2, b3, b4, b5, b6, b7, wb, sb, mb, x_ptr,
                                                              stride_x, gx, mcol, MAGIC, T, G, X_BF16, ASM, PAIRS)

            _emit_tile(y_ptr, part_ptr, a0, b0, 0, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 1:
                _emit_tile(y_ptr, part_ptr, a1, b1, 1, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 2:
                _emit_tile(y_ptr, part_ptr, a2, b2, 2, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 3:
                _emit_tile(y_ptr, part_ptr, a3, b3, 3, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 4:
                _emit_tile(y_ptr, part_ptr, a4, b4, 4, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 5:
                _emit_tile(y_ptr, part_ptr, a5, b5, 5, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 6:
                _emit_tile(y_ptr, part_ptr, a6, b6, 6, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if T > 7:
                _emit_tile(y_ptr, part_ptr, a7, b7, 7, pid_k, rn, rmask, NR, stride_y, T, SPLIT_K, GATED)
            if SPLIT_K:
                splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rmask, NR, stride_y, T, BN, SPLIT, GATED, SPLITP)


def _pick_split(n_blocks: int, iters: int, device: torch.device) -> int:
    """Split K until there are ~6 programs per SM (bytes in flight), ~7 when there are fewer row blocks
    than SMs (the 3840-row o-projections and down: the H100 sweep timed the 7B GDN o and attention o
    at 8.8 / 7.3 us with 15 splits against 9.7 / 8.3 us with 12 / 10), keeping >= 2 groups per split."""
    sms = num_sms(device)
    if n_blocks >= 4 * sms:
        return 1
    per_sm = 7 if n_blocks < sms else 6
    return max(1, min(cdiv(per_sm * sms, n_blocks), iters // 2))


# Defaults from the H200 sweep (scripts/gpu_check_kernels.py --sweep; kernels/NOTES.md "q4 sweep"):
# neither the bf16x2 pairs (fewer instructions, ~3e-3 relative error) nor more groups per iteration
# (longer row bursts) beat the plain fp32 kernel with one group per iteration by more than the
# run-to-run spread, except for the gated gate|up (pairs, 4 groups, 16 rows: ~10 %); the precise
# path stays the default.
DEFAULT_PAIRS = False
DEFAULT_BYTES_PER_ROW = 64  # contiguous weight bytes per row and iteration (GPI = this / (G/2))
DEFAULT_MMA = True  # tensor cores for one bf16 row of x at group size 128 (decode)
DEFAULT_PREFETCH = True  # tensor-core path: next group's loads issued before this group's math
DEFAULT_STAGES = 3  # tensor-core path without PREFETCH: groups in flight in Triton's pipelined loop
DEFAULT_GATE_HALVES = True  # gated tensor-core path: BN/2 gate rows + their up rows per program
DEFAULT_PREFETCH_DEPTH = 1  # groups the hand prefetch runs ahead
DEFAULT_MMA_ROWS_PER_WARP = 16  # tensor-core path: output rows per warp (16: one m16 tile per group)
WIDE_PROGRAMS = True  # tensor-core path: wide programs, split-K by a programs-per-SM target (below)
WIDE_ROWS_PER_WARP = 64  # with WIDE_PROGRAMS: four m16 tiles per warp, 256 rows (or 128 gate|up pairs)
# below sm_90 (A100, RTX 30 / 40 series) the 64-row programs spill: the sm_80 / 86 / 89 builds hold 255 registers
# plus 88-168 bytes of stack, 15-24 local loads / stores per iteration of the main loop; 32 rows per warp build
# with 152-181 registers and none (`scripts/gpu_check_kernels.py --aot --arch 86`). Those cards also need far
# fewer bytes in flight (~1 TB/s instead of 4.8). Not measured on such a card (none is lent here).
WIDE_ROWS_PER_WARP_PRE_HOPPER = 32
WIDE_PER_SM = 2.0  # with WIDE_PROGRAMS: programs per SM that split-K aims at (gated: WIDE_PER_SM_GATED)
WIDE_PER_SM_GATED = 2.0
# split-K partials of up to this many splits are added by one 2-D load and a reduction tree instead of
# a loop of loads (kernels._triton.splitk_finish)
SPLITK_TREE_MAX = 64
# the hand-prefetched tensor-core loop also loads its second group before the PDL wait (the first group
# peeled), so a program that is resident early has two groups in flight while it waits
PREWAIT_TWO = True
# a folded norm's producer loads its row block's residual and norm weight at its start instead of in the
# last program's tail (after the split-K atomic)
FOLD_PRELOAD = True
# head_rstd: a program whose groups touch at most four heads loads their rstds once, after the PDL wait,
# instead of each head's partial sums at every group
HEAD_RSTD_ONCE = True


def _wide_launch(gated: bool, device: torch.device) -> tuple[int, int, float]:
    """(rows per warp, warps, programs per SM) of the tensor-core path's wide programs. The
    H200 per-GEMV sweep (scripts/gpu_gemv_tiled_sweep.py, PDL-chained graphs) found every 7B projection
    faster with few wide programs (64 rows per warp, 4 warps, 1.5-4 programs per SM) than with the
    default 16 rows per warp and ~6-7 programs per SM; at 2 per SM: gdn_in 17.7 -> 15.1 us, qkv 11.5
    -> 11.2, gate|up 22.8 -> 15.6, down 12.0 -> 10.1, GDN o 8.2 -> 7.0, attention o 6.8 -> 6.1. tg128
    (same card, same run): H200 395 -> 418 t/s, H100 380 -> 394 t/s (docs/benchmarks.md, session 4)."""
    rows = WIDE_ROWS_PER_WARP if capability(device)[0] >= 9 else WIDE_ROWS_PER_WARP_PRE_HOPPER
    return rows, 4, (WIDE_PER_SM_GATED if gated else WIDE_PER_SM)


def _wide_split(n_blocks: int, iters: int, sms: int, per_sm: float) -> int:
    """Split count of the wide programs: at most per_sm programs per SM (one resident wave), >= 2
    groups per split. Rounding to the nearest count instead gave the 7B gdn_in, qkv and down 270-272
    programs for the 264 places of 2 per SM on 132 SMs, and tg128 3.5-4 % lower (H200)."""
    return max(1, min(int(per_sm * sms / n_blocks), iters // 2))


def _q4_launch(x, qweight, scales, mins, group_size, out, gated, tiled=False, *, block_n=None, split_k=None,
               num_warps=None, num_stages=2, pairs=None, groups_per_iter=None, mma=None, prefetch=None, stages=None,
               gate_halves=None, prefetch_depth=None, rstd=None, fold=None, dense=None, conv=None, head_rstd=None,
               row_sums=None):
    """The tuning knobs (keyword-only, shared by both public entry points): rows per program, K splits,
    warps, pipeline stages, bf16x2 math, groups per iteration, tensor cores, hand prefetch of the next
    group, Triton-pipelined group loop of the tensor-core path (stages), and for the gated tensor-core
    path BN/2 gate rows + their up rows per program instead of BN + BN (gate_halves), and how many
    groups ahead the hand prefetch loads (prefetch_depth 1 or 2; 2 needs two tiles per group); None
    picks the default. rstd = (ss, eps) / fold = (residual, w or None): the two sides of a folded norm
    (see q4_gemv_fold; with fold the result is (x_new, x~, ss)), tensor-core path only. conv / head_rstd:
    see q4_gemv (tensor-core path only). row_sums = (nq, nk): the result is (y, ss) with ss [blocks, 2] fp32,
    each row block's sums of squares of y[:nq] and y[nq:nq + nk] (split-K, tensor-core path only)."""
    x2 = _as_rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, k = x2.shape
    n_w, kb = qweight.shape
    g = int(group_size)
    if kb * 2 != k or g < 8 or k % g or g & (g - 1):
        raise ValueError(f"q4 shapes: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, group {g}")
    if not 1 <= t <= 8:
        raise ValueError(f"q4_gemv takes 1..8 rows, got {t}")
    nr = n_w // 2 if gated else n_w
    ngr = k // g
    if tiled and nr % TILE_ROWS:
        raise ValueError(f"the tiled q4 layout needs {'gate rows' if gated else 'rows'} a multiple of {TILE_ROWS}")
    qweight = qweight.contiguous()
    if qweight.data_ptr() % 16:
        qweight = qweight.clone()
    qw32 = qweight.view(torch.int32)  # [N, K/8]: 8 nibbles per word
    scales = scales.contiguous()
    mins = mins.contiguous()
    x_bf16 = x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0 and x2.stride(0) % 2 == 0
    x_arg = x2.view(torch.int32) if x_bf16 else x2  # bf16 pairs, unpacked with shifts
    stride_x = x2.stride(0) // 2 if x_bf16 else x2.stride(0)
    if fold is not None:  # the rows go to x_new (the residual's shape and dtype), not to a y
        if fold[0].numel() != nr or not fold[0].is_contiguous():
            raise ValueError(f"a fold's residual needs {nr} contiguous values")
        out = torch.empty_like(fold[0])
    elif out is None:
        shape = (nr,) if x.dim() == 1 else (t, nr)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = _as_rows(out)
    if y2.stride(-1) != 1 or tuple(y2.shape) != (t, nr):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(t, nr)} with a unit last stride")

    use_mma = (DEFAULT_MMA and t == 1 and x_bf16 and g == 128) if mma is None else bool(mma)
    if use_mma and not (t == 1 and x_bf16 and g == 128):
        raise ValueError("the tensor-core q4 path takes one bf16 row of x and group size 128")
    if (rstd is not None or fold is not None) and not use_mma:
        raise ValueError("a folded norm runs on the tensor-core q4 path only (one bf16 row, group 128)")
    if (conv is not None or head_rstd is not None or row_sums is not None) and not use_mma:
        raise ValueError("conv, head_rstd and row_sums run on the tensor-core q4 path only (one bf16 row, group 128)")
    if row_sums is not None and (gated or fold is not None or conv is not None or ngr < 2
                                 or not 0 <= row_sums[0] <= row_sums[0] + row_sums[1] <= nr):
        raise ValueError("row_sums: a plain projection of at least two groups, nq + nk <= its rows")
    if fold is not None and (gated or ngr < 2):
        raise ValueError("the producer of a folded norm is a plain projection with at least two groups")
    wide = None
    if use_mma and WIDE_PROGRAMS and block_n is None and num_warps is None and split_k is None:
        wide = _wide_launch(gated, x.device)
        block_n, num_warps = wide[0] * wide[1], wide[1]
    num_warps = num_warps or 4
    if use_mma:
        groups_per_iter = 1
        # two row halves of 8 rows per warp (one m16 tile) per 16 rows per warp
        block_n = block_n or DEFAULT_MMA_ROWS_PER_WARP * num_warps
        if block_n % (16 * num_warps):
            # each warp must own whole m16 tiles (8 rows in each half); replicated layouts break the MMA
            # lane mapping (measured: wrong results for block_n=32 with 4 or 8 warps)
            raise ValueError("the tensor-core q4 path needs block_n to be a multiple of 16 * num_warps")
    # BN rows x GPI groups per iteration: each row contributes GPI * G/2 contiguous bytes (DRAM
    # bursts: 64-byte row pieces reached only ~40 % of copy bandwidth on the H200)
    gpi = groups_per_iter or max(1, min(DEFAULT_BYTES_PER_ROW // (g // 2), ngr))
    gpi = min(next_pow2(gpi), next_pow2(ngr))
    bn = block_n or max(16, min(8192 // (g * gpi), next_pow2(nr)))
    if block_n is None and t * (2 if gated else 1) > 4:
        bn = max(16, bn // 2)  # one [BN, W] accumulator per row of x (and half): keep them in registers
    ghalf = bool(use_mma and gated and (DEFAULT_GATE_HALVES if gate_halves is None else gate_halves))
    n_blocks = cdiv(nr, bn // 2 if ghalf else bn)  # output rows per program: BN, or BN/2 gate|up pairs
    iters = cdiv(ngr, gpi)
    if split_k is None:
        split_k = _wide_split(n_blocks, iters, num_sms(x.device), wide[2]) if wide else \
            _pick_split(n_blocks, iters, x.device)
    # a fold and row sums are finished in the split-K tail
    split_k = max(2 if (fold is not None or row_sums is not None) else 1, min(int(split_k), iters))
    gps = cdiv(iters, split_k) * gpi  # groups per split: whole iterations
    split_k = cdiv(ngr, gps)  # no empty splits
    if split_k > 1:
        part = workspace("q4_part", (split_k, t, n_w), torch.float32, x.device)
        cnt = workspace("q4_cnt", (n_blocks,), torch.int32, x.device)
    else:
        part = cnt = y2  # unused
    pdl = use_pdl(x2)
    pf = DEFAULT_PREFETCH if prefetch is None else bool(prefetch)
    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else int(prefetch_depth)
    pf2 = bool(use_mma and pf and depth == 2 and (ghalf or not gated))
    extra = {}
    if rstd is not None:
        ss_in, eps = rstd
        extra.update(rss_ptr=ss_in, NSS=ss_in.numel(), eps_r=float(eps), RSTD=True, NSSP=max(2, next_pow2(ss_in.numel())))
    if fold is not None:
        res, fw = fold
        if fw is not None and fw.numel() != nr:
            raise ValueError(f"a fold's norm weight needs {nr} values")
        xt = torch.empty((1, nr), dtype=x.dtype, device=x.device) if fw is not None else None
        ss_out = workspace("q4_fold_ss", (n_blocks,), torch.float32, x.device) if fw is not None else None
        extra.update(FOLD=1 if fw is None else 2, res_ptr=res, fw_ptr=fw, xt_ptr=xt, ss_ptr=ss_out,
                     FPRE=FOLD_PRELOAD)
        out = (out, xt, ss_out)
    if conv is not None:
        cw, cs, act = conv
        nc = act.numel()
        kc = cw.numel() // max(nc, 1)
        if (gated or fold is not None or not 0 < nc <= nr or kc < 2 or cw.numel() != nc * kc
                or not (cw.is_contiguous() and cs.is_contiguous() and act.is_contiguous())
                or cs.numel() != nc * (kc - 1) or act.dtype != torch.float32):
            raise ValueError("conv: a plain projection, contiguous conv weights [C, K], state [C, K-1] and an fp32 "
                             "[C] output for its first C <= N rows")
        extra.update(CONV=True, cw_ptr=cw, cs_ptr=cs, act_ptr=act, NCONV=nc, KC=kc, KP=next_pow2(kc))
    if head_rstd is not None:
        hs, eps_h = head_rstd
        nh = hs.shape[0] if hs.dim() == 2 else 0
        dv = k // nh if nh else 0
        if not nh or k % nh or dv % (g // 2) or hs.dtype != torch.float32 or not hs.is_contiguous():
            raise ValueError(f"head_rstd: an fp32 [H, blocks] tensor whose H divides K = {k} into heads of a "
                             f"multiple of {g // 2}")
        extra.update(HEADNORM=1, hs_ptr=hs, NVB=hs.shape[1], DV=dv, eps_h=float(eps_h))
    n_extra = 0
    if dense is not None:  # (Wd [E, K] bf16, d [E] fp32): extra programs, one dense row each
        wd, d_out = dense
        if (not (x_bf16 and t == 1) or wd.dtype != torch.bfloat16 or wd.dim() != 2 or wd.shape[1] != k
                or not wd.is_contiguous() or d_out.dtype != torch.float32 or d_out.numel() != wd.shape[0]
                or not d_out.is_contiguous()):
            raise ValueError("dense rows: one bf16 row of x, a contiguous bf16 [E, K] weight and an fp32 [E] "
                             "output")
        n_extra = cdiv(wd.shape[0], split_k)
        extra.update(wd_ptr=wd.view(torch.int32), d_ptr=d_out, ND=wd.shape[0], NB=n_blocks, DENSE=True,
                     BKW=next_pow2(k // 2))
    if row_sums is not None:
        rsum = workspace("q4_row_sums", (n_blocks, 2), torch.float32, x.device)
        extra.update(RSUM=True, rsum_ptr=rsum, NQS=int(row_sums[0]), NKS=int(row_sums[1]))
        out = (out, rsum)
    if head_rstd is not None and HEAD_RSTD_ONCE and cdiv(gps * g, extra["DV"]) + 1 <= 4:
        extra["HEADNORM"] = 2  # each program's groups touch at most four heads: their rstds loaded once
    _q4_gemv_kernel[(split_k, n_blocks + n_extra)](
        x_arg, qw32, scales, mins, y2, part, cnt,
        nr, ngr, stride_x, y2.stride(0), gps, split_k, 0x3F800000,
        T=t, G=g, BN=bn, SPLIT_K=split_k > 1, GATED=gated, X_BF16=x_bf16, ASM=x_bf16 and x2.is_cuda,
        PAIRS=DEFAULT_PAIRS if pairs is None else bool(pairs), GPI=gpi, MMA=use_mma,
        PREFETCH=pf, USE_PDL=pdl,
        TR=TILE_ROWS if tiled else 0, STAGES=1 if pf else (stages or DEFAULT_STAGES), GHALF=ghalf, PF2=pf2,
        SPLITP=next_pow2(split_k) if 1 < split_k <= SPLITK_TREE_MAX else 0,
        PW2=bool(use_mma and pf and not pf2 and PREWAIT_TWO and not (gated and not ghalf)),
        num_warps=num_warps, num_stages=num_stages, **extra, **pdl_kwargs(pdl),
    )
    return out


def q4_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                   group_size: int, out: torch.Tensor | None = None, tiled: bool = False, **tune) -> torch.Tensor:
    """Triton version of q4_gemv_ref (``tune``: the keyword-only knobs of _q4_launch, for tests and tuning)."""
    return _q4_launch(x, qweight, scales, mins, group_size, out, False, tiled, **tune)


def q4_gemv_silu_mul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                            group_size: int, out: torch.Tensor | None = None, tiled: bool = False,
                            **tune) -> torch.Tensor:
    """Triton version of q4_gemv_silu_mul_ref (gate and up rows of one block share a program)."""
    if qweight.shape[0] % 2:
        raise ValueError("a merged gate|up weight needs an even number of rows")
    return _q4_launch(x, qweight, scales, mins, group_size, out, True, tiled, **tune)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _fits(x: torch.Tensor) -> bool:
    """The decode kernel takes 1..8 rows; more rows (prefill) go to the reference path."""
    return x.dim() == 1 or x.shape[0] <= 8


def _mma_fits(x: torch.Tensor, group_size: int) -> bool:
    """Whether the tensor-core path (and so a folded norm) takes x: one bf16 row, group size 128."""
    return x.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and group_size == 128


def q4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    tiled: bool = False,
    rstd: tuple | None = None,
    dense: tuple | None = None,
    conv: tuple | None = None,
    head_rstd: tuple | None = None,
    row_sums: tuple | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x @ W.T for one to eight rows of x; rstd = (ss, eps): x is the x~ of a folded norm (see
    q4_gemv_fold). dense = (Wd, d): also d = x @ Wd.T (times the folded norm's rstd) for a dense bf16 Wd
    [E, K] into the fp32 [E] tensor d, in the same launch on the tensor-core path (the GDN a|b rows).
    conv = (Wc [C, Kc], state [C, Kc-1], act [C] fp32), one row of x: the first C outputs (rounded to
    x.dtype) are also a short causal conv's inputs: act = silu(conv over [state, y]) in fp32 and the state
    shifts to end with y (the GDN q|k|v conv, so the GDN step takes activations). head_rstd = (hs [H, B]
    fp32, eps): x holds H heads without their RMSNorm scale; each head is scaled by rsqrt(sum(hs[h]) / dv +
    eps) and rounded to x.dtype before the product (the GDN step's gated norm, folded into the o projection).
    row_sums = (nq, nk), one row of x: returns (y, ss), ss [B, 2] fp32 whose column sums are the sums of
    squares of y[:nq] and y[nq:nq + nk] as stored (rounded to y's dtype): attention's whole-row q/k norms
    without a pass over y (B row blocks on the tensor-core path, B = 1 otherwise)."""
    if use_triton(x) and _fits(x) and (
            all(a is None for a in (rstd, dense, conv, head_rstd, row_sums)) or _mma_fits(x, group_size)):
        return q4_gemv_triton(x, qweight, scales, mins, group_size, out, tiled, rstd=rstd, dense=dense,
                              conv=conv, head_rstd=head_rstd, row_sums=row_sums)
    if (dense is not None or conv is not None or row_sums is not None) and x.numel() != x.shape[-1]:
        raise ValueError("dense rows, the conv epilogue and row sums take one row of x")
    if head_rstd is not None:
        x = head_scale_ref(x, head_rstd)
    y = q4_gemv_ref(x, qweight, scales, mins, group_size, out, tiled, rstd)
    if dense is not None:
        wd, d_out = dense
        dd = x.reshape(-1).float() @ wd.float().T
        d_out.copy_(dd * _rstd(rstd, x.shape[-1]))
    if conv is not None:
        conv_step_ref(y.reshape(-1), *conv)
    if row_sums is not None:
        return y, row_sums_ref(y, *row_sums)
    return y


def row_sums_ref(y: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """[1, 2] fp32: the sums of squares of y[:nq] and y[nq:nq + nk] (q4_gemv's row_sums)."""
    yf = y.reshape(-1).to(torch.float32)
    return torch.stack([yf[:nq].square().sum(), yf[nq:nq + nk].square().sum()]).reshape(1, 2)


def head_scale_ref(x: torch.Tensor, head_rstd: tuple) -> torch.Tensor:
    """x [.., H * dv] with head h scaled by rsqrt(sum(hs[h]) / dv + eps), rounded to x.dtype (head_rstd = (hs
    [H, B], eps))."""
    hs, eps = head_rstd
    nh = hs.shape[0]
    rs = torch.rsqrt(hs.to(torch.float32).sum(1) / (x.shape[-1] // nh) + eps)
    return (x.to(torch.float32) * rs.repeat_interleave(x.shape[-1] // nh)).to(x.dtype)


def conv_step_ref(y: torch.Tensor, conv_w: torch.Tensor, conv_state: torch.Tensor, act: torch.Tensor) -> None:
    """One token of a short causal conv on the first C values of y: act [C] = silu(sum over the window [state,
    y]) in fp32; the state [C, K-1] shifts left and ends with y."""
    c = act.numel()
    kc = conv_w.numel() // c
    win = torch.cat([conv_state.to(torch.float32), y[:c].to(torch.float32)[:, None]], dim=1)
    act.copy_(torch.nn.functional.silu((win * conv_w.reshape(c, kc).to(torch.float32)).sum(dim=1)))
    conv_state.copy_(win[:, 1:])


def q4_gemv_fold(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 residual: torch.Tensor, w: torch.Tensor | None = None, tiled: bool = False,
                 head_rstd: tuple | None = None):
    """Dispatch of q4_gemv_fold_ref: on the tensor-core path the split-K tail of each row block writes
    x_new, x~ and the block's sum of squares (no norm launch). head_rstd: as q4_gemv."""
    if use_triton(x) and _mma_fits(x, group_size) and 2 * qweight.shape[1] // group_size >= 2:
        return _q4_launch(x, qweight, scales, mins, group_size, None, False, tiled, fold=(residual, w),
                          head_rstd=head_rstd)
    if head_rstd is not None:
        x = head_scale_ref(x, head_rstd)
    return q4_gemv_fold_ref(x, qweight, scales, mins, group_size, residual, w, tiled)


def q4_gemv_silu_mul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    tiled: bool = False,
    rstd: tuple | None = None,
) -> torch.Tensor:
    if use_triton(x) and _fits(x) and (rstd is None or _mma_fits(x, group_size)):
        return q4_gemv_silu_mul_triton(x, qweight, scales, mins, group_size, out, tiled, rstd=rstd)
    return q4_gemv_silu_mul_ref(x, qweight, scales, mins, group_size, out, tiled, rstd)
