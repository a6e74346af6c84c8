"""q4 weight -> dense [N, K] in one pass, for prefill (dequantize a layer, then one tensor-core GEMM).

Layout (docs/contracts.md): qweight uint8 [N, K//2], scales / mins fp16 [N, K//G]; in group g, byte i
holds column g*G + i (low nibble) and g*G + G/2 + i (high nibble); w = q * scale + min.

Ops (same signature for reference, Triton kernel and dispatch; each writes `out` and returns it):
  q4_dequantize_into_ref(qweight, scales, mins, group_size, out, tiled=False)
  q4_dequantize_triton(qweight, scales, mins, group_size, out, tiled=False)
  q4_dequantize_into(qweight, scales, mins, group_size, out, tiled=False)   dispatch (use_triton(out))
tiled: the weight in gemv_q4's tiled layout (slabs of 64 rows, group-major); out is always [N, K].
out: a contiguous [N, K] tensor of any float dtype (bf16 / fp16 / fp32); math in fp32, one rounding
to out's dtype at the end (the reference rounds q*s and then +m in fp32; the kernel may use an FMA).

  q4_dequantize_scratch(qweight, scales, mins, group_size, dtype) -> [N, K]
a view into one scratch buffer per (device, dtype), grown as needed and reused by the next call:
valid until the next call on that device and dtype. Ops on one stream run in order, so
`F.linear(x, q4_dequantize_scratch(...))` layer after layer is safe; never keep the view (autograd
that saves the weight for backward must use a fresh tensor: `fresh=True`).

Kernel: the weight is seen as M = N*K/G "group rows" of G/2 bytes, which expand to G contiguous
outputs with one scale and one min each. A program takes BM group rows: one [BM, G/2] byte tile
(contiguous, 16-byte loads), two [BM, G/2] stores (low / high nibbles; G/2 contiguous elements per
row). Nibble -> float by bit trick (0x4B000000 | q is the float 2^23 + q; subtracting 2^23 is exact)
rather than an int->float conversion. Bytes moved per weight: 0.5 read + 4/G for scale and min,
plus out's element size written (2.53 B for bf16 at G = 128).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, tl, triton, use_triton

__all__ = [
    "clear_scratch",
    "q4_dequantize_into",
    "q4_dequantize_into_ref",
    "q4_dequantize_scratch",
    "q4_dequantize_triton",
]


def _check(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
           out: torch.Tensor) -> tuple[int, int, int]:
    n, kb = qweight.shape
    k = 2 * kb
    g = int(group_size)
    if g < 2 or g % 2 or k % g:
        raise ValueError(f"q4: K={k} is not a multiple of the group size {g}")
    if tuple(scales.shape) != (n, k // g) or tuple(mins.shape) != (n, k // g):
        raise ValueError(f"q4: scales {tuple(scales.shape)} / mins {tuple(mins.shape)}, "
                         f"expected {(n, k // g)}")
    if tuple(out.shape) != (n, k) or not out.is_contiguous() or not out.is_floating_point():
        raise ValueError(f"q4 dequantize: out must be a contiguous float [{n}, {k}] tensor, "
                         f"got {tuple(out.shape)} {out.dtype}")
    return n, k, g


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def q4_dequantize_into_ref(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                           out: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """out <- dequantize(qweight) (fp32 math, as kernels.gemv_q4.q4_dequantize), rounded to out.dtype;
    ``tiled``: qweight/scales/mins in the tiled layout of gemv_q4.q4_tile (out is the standard [N, K])."""
    from .gemv_q4 import q4_dequantize

    _check(qweight, scales, mins, group_size, out)
    out.copy_(q4_dequantize(qweight, scales, mins, group_size, tiled))
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _q4_dequant_kernel(qw_ptr, s_ptr, m_ptr, out_ptr, M, NGR, MAGIC,
                           HG: tl.constexpr, BM: tl.constexpr, TR: tl.constexpr):
        """Group rows pid*BM .. pid*BM+BM-1 of M (in memory order): bytes [BM, HG] -> outputs [BM, 2*HG].
        TR > 0: the tiled layout (gemv_q4.q4_tile), whose group row m is group (m // TR) % NGR of
        row (m // (TR * NGR)) * TR + m % TR."""
        pid = tl.program_id(0)
        rm = pid.to(tl.int64) * BM + tl.arange(0, BM)
        rmask = rm < M
        ri = tl.arange(0, HG)
        b = tl.load(qw_ptr + rm[:, None] * HG + ri[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        s = tl.load(s_ptr + rm, mask=rmask, other=0).to(tl.float32)[:, None]
        mn = tl.load(m_ptr + rm, mask=rmask, other=0).to(tl.float32)[:, None]
        # 0x4B000000 | q is the float 2^23 + q (q < 2^23): subtracting 2^23 gives q exactly
        lo = ((b & 15) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((b >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
        if TR:
            orow = (rm // (TR * NGR)) * TR + rm % TR
            ocol = ((rm // TR) % NGR) * (2 * HG)
            dst = out_ptr + (orow * NGR * (2 * HG) + ocol)[:, None] + ri[None, :]
        else:
            dst = out_ptr + rm[:, None] * (2 * HG) + ri[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (lo * s + mn).to(ty), mask=rmask[:, None])
        tl.store(dst + HG, (hi * s + mn).to(ty), mask=rmask[:, None])


def q4_dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                         out: torch.Tensor, tiled: bool = False, *, block_m: int | None = None,
                         num_warps: int = 4) -> torch.Tensor:
    """Triton version of q4_dequantize_into_ref (block_m / num_warps are tuning knobs)."""
    from .gemv_q4 import TILE_ROWS

    n, k, g = _check(qweight, scales, mins, group_size, out)
    if tiled and n % TILE_ROWS:
        raise ValueError(f"the tiled q4 layout needs rows a multiple of {TILE_ROWS}, got {n}")
    if g & (g - 1) or g < 8:
        return q4_dequantize_into_ref(qweight, scales, mins, group_size, out, tiled)  # arange: powers of 2
    m = n * (k // g)
    if m == 0:
        return out
    qweight, scales, mins = qweight.contiguous(), scales.contiguous(), mins.contiguous()
    # ~8K outputs per program (4 warps: 64 per thread), at least one group row
    bm = block_m or max(1, min(8192 // g, 1 << max(0, m - 1).bit_length()))
    _q4_dequant_kernel[(cdiv(m, bm),)](qweight, scales, mins, out, m, k // g, 0x4B000000,
                                       HG=g // 2, BM=bm, TR=TILE_ROWS if tiled else 0, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------
# dispatch and the shared scratch buffer
# ----------------------------------------------------------------------------------------------
def q4_dequantize_into(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                       out: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    if use_triton(out):
        return q4_dequantize_triton(qweight, scales, mins, group_size, out, tiled)
    return q4_dequantize_into_ref(qweight, scales, mins, group_size, out, tiled)


_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def q4_dequantize_scratch(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                          dtype: torch.dtype, fresh: bool = False, tiled: bool = False) -> torch.Tensor:
    """The dequantized [N, K] weight in `dtype`, written into the shared scratch buffer of qweight's
    device and `dtype` (valid until the next call there), or into a new tensor with `fresh`."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if fresh:
        out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    else:
        key = (str(qweight.device), dtype)
        buf = _SCRATCH.get(key)
        if buf is None or buf.numel() < n * k:
            _SCRATCH.pop(key, None)  # free the old one before allocating the larger one
            del buf
            buf = torch.empty(n * k, dtype=dtype, device=qweight.device)
            _SCRATCH[key] = buf
        out = buf[: n * k].view(n, k)
    return q4_dequantize_into(qweight, scales, mins, group_size, out, tiled)


def clear_scratch() -> None:
    """Drop the scratch buffers (their memory returns to torch's caching allocator)."""
    _SCRATCH.clear()
