"""4-bit NormalFloat (bitsandbytes nf4 / fp4) GEMV for decode: y = x @ W.T for one row of x, reading the
packed weights once (the layer is never dequantized into a temporary).

Layout (bitsandbytes 4-bit, quant.linear.NF4Linear): packed uint8 [N*K/2] in row-major element order,
byte i holds element 2i in its high nibble and 2i+1 in its low nibble; element j is
code[q_j] * absmax[j // blocksize] (absmax fp32 [N*K/blocksize], double quantization already undone;
code: the 16-entry fp32 quant map). The kernel needs whole blocks per row (K % blocksize == 0) and K a
multiple of 8; NF4Linear keeps its chunked dequantize + matmul for anything else.

Ops (same signature for reference, Triton kernel and dispatch):
  nf4_gemv(x, packed, absmax, code, blocksize, n, out=None) -> y [1, N] (x.dtype)

Kernel: a program owns BN rows and one K slice and reads the packed bytes as int32 words (8 weights:
bytes j = 0..3 hold elements 8w + 2j (high nibble) and 8w + 2j + 1 (low)). On the GPU (bf16 x) each
nibble's value comes from a lookup in registers (_LOOKUP: prmt on byte tables of the entries' bf16
values); in the interpreter (and for other x dtypes) it is gathered from the 16-entry fp32 table, which
on the GPU ran at ~11 % of copy against 26-33 % for the lookup (H200). The values are multiplied with x
(read as bf16 pairs: a pair holds exactly one byte's two elements) and each word column is scaled by its
block's absmax. Split-K partials are added by the last program of a row block
(kernels._triton.splitk_finish: deterministic, CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from ._triton import (HAS_TRITON, cdiv, num_sms, pdl_kwargs, tl, triton, use_pdl, use_triton, workspace)

if HAS_TRITON:
    from ._triton import emit_rows, pdl_launch_dependents, pdl_wait, splitk_finish

__all__ = ["nf4_fits", "nf4_gemv", "nf4_gemv_ref", "nf4_gemv_triton"]

# bf16 x on the GPU: the 16-entry table looked up in registers (prmt) instead of gathered from memory
# per nibble (the gathers ran the 7B projections at ~11 % of copy on an H200)
REGISTER_LOOKUP = True
_TABLES: dict[tuple, tuple[int, ...]] = {}

# Two bytes' 4 nibbles -> the bf16 values of their table entries, as two bf16x2 pairs (the pair of
# byte j: element 2j in the low half, 2j + 1 in the high half, as x's pair j). The 16-entry
# table is held as its entries' high bytes (T0..T3, four entries per register) and low bytes
# (L0..L3). For 4 nibbles at a time (a prmt selector): entries 0-7 and 8-15 are looked up by the
# nibbles' low 3 bits (prmt), and each byte is taken from one or the other by the nibble's bit 3
# (one more prmt); a last prmt per pair puts each element's low and high byte together.
# Operands: $2 (its low 16 bits: the 4 nibbles), $3..$6 = T0..T3, $7..$10 = L0..L3; out $0, $1: the pairs.
_LOOKUP_PTX = """{
    .reg .b32 s7, s8, sel, a, b, h, l;
    and.b32 s7, $2, 0x7777;
    and.b32 s8, $2, 0x8888;
    shr.b32 s8, s8, 1;
    or.b32 sel, s8, 0x3210;
    prmt.b32 a, $3, $4, s7;
    prmt.b32 b, $5, $6, s7;
    prmt.b32 h, a, b, sel;
    prmt.b32 a, $7, $8, s7;
    prmt.b32 b, $9, $10, s7;
    prmt.b32 l, a, b, sel;
    prmt.b32 $0, l, h, 0x4051;
    prmt.b32 $1, l, h, 0x6273;
    }"""


def _byte_tables(code: torch.Tensor) -> tuple[int, ...]:
    """(T0..T3, L0..L3): the high and low bytes of the table's bf16 values (round to nearest), four
    entries per int32 (entry 4r + i in byte i of register r), as signed ints. Read from the device once
    per table (the decode step's warm-up runs before any graph capture)."""
    key = (code.data_ptr(), str(code.device), code.dtype)
    if key not in _TABLES:
        bits = code.detach().reshape(16).float().cpu().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
        regs = []
        for part in (bits >> 8, bits & 0xFF):
            for r in range(4):
                v = sum(int(part[4 * r + i]) << (8 * i) for i in range(4))
                regs.append(v - (1 << 32) if v >= 1 << 31 else v)
        _TABLES[key] = (code, tuple(regs))  # the reference keeps the address from being reused
    return _TABLES[key][1]


def _check(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
           n: int) -> int:
    k = x.shape[-1]
    if x.numel() != k:
        raise ValueError(f"nf4_gemv takes one row of x, got {tuple(x.shape)}")
    if packed.numel() * 2 != n * k or absmax.numel() * blocksize != n * k or code.numel() != 16:
        raise ValueError(f"nf4 shapes: x {tuple(x.shape)}, packed {packed.numel()} bytes, absmax {absmax.numel()}, "
                         f"code {code.numel()}, blocksize {blocksize}, {n} rows")
    return k


def nf4_gemv_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T with W dequantized in fp32 (code[q] * absmax of its block); result [1, N] in x.dtype."""
    k = _check(x, packed, absmax, code, blocksize, n)
    flat = packed.reshape(-1)
    q = torch.stack(((flat >> 4) & 15, flat & 15), -1).reshape(n, k).long()
    w = code.float()[q] * absmax.float().reshape(n, k // blocksize).repeat_interleave(blocksize, dim=1)
    y = x.reshape(1, k).float() @ w.T
    if out is None:
        return y.to(x.dtype)
    out.copy_(y.reshape(out.shape))
    return out


def nf4_fits(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """Whether the fused kernel takes this call: one row of bf16 / fp16 / fp32 x, whole blocks per row of
    at least 8 elements (blocksize a power of two), K a multiple of 8."""
    return (x.numel() == x.shape[-1] == k and k % 8 == 0 and blocksize >= 8 and blocksize & (blocksize - 1) == 0
            and k % blocksize == 0)


if HAS_TRITON:

    _LOOKUP = tl.constexpr(_LOOKUP_PTX)  # a global constexpr: a jit function may read it

    @triton.jit
    def _lookup(sel, t0, t1, t2, t3, l0, l1, l2, l3):
        z = tl.zeros_like(sel)
        return tl.inline_asm_elementwise(_LOOKUP, "=r,=r,r,r,r,r,r,r,r,r,r",
                                         [sel, z + t0, z + t1, z + t2, z + t3, z + l0, z + l1, z + l2, z + l3],
                                         dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _pair_dot(p, x_ptr, col, j: tl.constexpr, cmask):
        """sum of a bf16x2 weight pair (low: element 8w + 2j, high: + 1) times x's pair j, as fp32."""
        xp = tl.load(x_ptr + 4 * col + j, mask=cmask, other=0)
        w_lo = (p << 16).to(tl.float32, bitcast=True)
        w_hi = (p & -65536).to(tl.float32, bitcast=True)
        return w_lo * (xp << 16).to(tl.float32, bitcast=True)[None, :] + \
            w_hi * (xp & -65536).to(tl.float32, bitcast=True)[None, :]

    @triton.jit
    def _gather_dot(words, code_ptr, x_ptr, col, cmask, X_BF16: tl.constexpr):
        """sum over a block of words' 8 nibbles of code[q] * x, each value gathered from code (fp32)."""
        part = tl.zeros(words.shape, dtype=tl.float32)
        for j in tl.static_range(4):
            byte = (words >> (8 * j)) & 0xFF
            c_hi = tl.load(code_ptr + (byte >> 4))
            c_lo = tl.load(code_ptr + (byte & 15))
            if X_BF16:  # one int32 of x holds this byte's two elements (low half: element 8w + 2j)
                xp = tl.load(x_ptr + 4 * col + j, mask=cmask, other=0)
                x_hi = (xp << 16).to(tl.float32, bitcast=True)
                x_lo = (xp & -65536).to(tl.float32, bitcast=True)
            else:
                x_hi = tl.load(x_ptr + 8 * col + 2 * j, mask=cmask, other=0).to(tl.float32)
                x_lo = tl.load(x_ptr + 8 * col + 2 * j + 1, mask=cmask, other=0).to(tl.float32)
            part = part + c_hi * x_hi[None, :] + c_lo * x_lo[None, :]
        return part

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, w_ptr, am_ptr, code_ptr, y_ptr, part_ptr, cnt_ptr, NR, KW, WPS, SPLIT,
                         t0, t1, t2, t3, l0, l1, l2, l3,
                         BN: tl.constexpr, BW: tl.constexpr, BSW: tl.constexpr, SPLIT_K: tl.constexpr,
                         X_BF16: tl.constexpr, USE_PDL: tl.constexpr, SPLITP: tl.constexpr, ASM: tl.constexpr):
        """Rows pid_n * BN.., words pid_k * WPS.. of each row (BW per iteration); BSW words per absmax block.
        ASM (bf16 x, on the GPU): the table lookup in registers (_LOOKUP, the table's bf16 values as byte
        tables t*, l*); else each nibble's fp32 value is gathered from code (the interpreter's path)."""
        pdl_launch_dependents(USE_PDL)
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rmask = rn < NR
        bw = tl.arange(0, BW)
        nb_row = KW // BSW  # absmax blocks per row
        acc = tl.zeros([BN, BW], dtype=tl.float32)
        w_begin = pid_k * WPS
        w_end = tl.minimum(w_begin + WPS, KW)
        pdl_wait(USE_PDL)
        for w0 in range(w_begin, w_end, BW):
            col = w0 + bw
            cmask = col < w_end
            m2 = rmask[:, None] & cmask[None, :]
            words = tl.load(w_ptr + rn[:, None] * KW + col[None, :], mask=m2, other=0)
            am = tl.load(am_ptr + rn[:, None] * nb_row + col[None, :] // BSW, mask=m2, other=0.0)
            if ASM:
                p0, p1 = _lookup(words, t0, t1, t2, t3, l0, l1, l2, l3)  # bytes 0, 1 of each word
                p2, p3 = _lookup(words >> 16, t0, t1, t2, t3, l0, l1, l2, l3)  # bytes 2, 3
                part = _pair_dot(p0, x_ptr, col, 0, cmask) + _pair_dot(p1, x_ptr, col, 1, cmask) + \
                    _pair_dot(p2, x_ptr, col, 2, cmask) + _pair_dot(p3, x_ptr, col, 3, cmask)
            else:
                part = _gather_dot(words, code_ptr, x_ptr, col, cmask, X_BF16)
            acc = acc + part * am
        y = tl.sum(acc, 1)
        emit_rows(y_ptr, part_ptr, y, y, 0, pid_k, rn, rmask, NR, 0, 1, SPLIT_K, False)
        if SPLIT_K:
            splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rmask, NR, 0, 1, BN, SPLIT, False, SPLITP)


def nf4_gemv_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, n: int, out: torch.Tensor | None = None, *, block_n: int = 64,
                    block_w: int = 32, split_k: int | None = None, num_warps: int = 4,
                    lookup: bool | None = None) -> torch.Tensor:
    """Triton version of nf4_gemv_ref (knobs: rows per program, int32 words per row and iteration, K
    splits (None: ~6 programs per SM), warps, the register table lookup (None: REGISTER_LOOKUP; it
    needs bf16 x on the GPU)). H200, 7B shapes (scripts/gpu_nf4_probe.py): 32 words per row and
    iteration 13.7-36.7 us per projection, 26-33 % of copy, against 15.1-45.2 at 16; 128 rows about the
    same; 32 rows or 8 warps slower."""
    k = _check(x, packed, absmax, code, blocksize, n)
    if not nf4_fits(x, k, blocksize):
        raise ValueError(f"the nf4 kernel needs whole blocks per row and K % 8 == 0 (K {k}, blocksize {blocksize})")
    x1 = x.reshape(k)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    x_bf16 = x1.dtype == torch.bfloat16 and x1.data_ptr() % 4 == 0
    x_arg = x1.view(torch.int32) if x_bf16 else x1
    flat = packed.reshape(-1)
    if flat.data_ptr() % 4:
        flat = flat.clone()
    w32 = flat.view(torch.int32)  # [N * K/8]: 8 weights per word
    am = absmax.reshape(-1)
    if am.dtype != torch.float32 or not am.is_contiguous():
        am = am.float().contiguous()
    tables = _byte_tables(code) if x_bf16 and x1.is_cuda and (REGISTER_LOOKUP if lookup is None else lookup) \
        else None
    code = code.reshape(-1).float().contiguous()
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    elif not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"out must be contiguous with {n} elements")
    kw = k // 8
    bw = max(1, min(block_w, 1 << (kw.bit_length() - 1)))  # a power of two, at most one row's words
    n_blocks = cdiv(n, block_n)
    iters = cdiv(kw, bw)
    if split_k is None:
        sms = num_sms(x.device)
        split_k = 1 if n_blocks >= 4 * sms else max(1, min(cdiv(6 * sms, n_blocks), iters // 2))
    split_k = max(1, min(int(split_k), iters))
    per_split = cdiv(iters, split_k)
    split_k = cdiv(iters, per_split)
    if split_k > 1:
        part = workspace("nf4_part", (split_k, 1, n), torch.float32, x.device)
        cnt = workspace("nf4_cnt", (n_blocks,), torch.int32, x.device)
    else:
        part = cnt = out  # unused
    pdl = use_pdl(x1)
    _nf4_gemv_kernel[(split_k, n_blocks)](
        x_arg, w32, am, code, out.view(-1), part, cnt, n, kw, per_split * bw, split_k, *(tables or (0,) * 8),
        BN=block_n, BW=bw, BSW=blocksize // 8, SPLIT_K=split_k > 1, X_BF16=x_bf16, USE_PDL=pdl,
        ASM=tables is not None,
        SPLITP=1 << (split_k - 1).bit_length() if 1 < split_k <= 64 else 0,
        num_warps=num_warps, **pdl_kwargs(pdl),
    )
    return out


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    fn = nf4_gemv_triton if use_triton(x) else nf4_gemv_ref
    return fn(x, packed, absmax, code, blocksize, n, out)
