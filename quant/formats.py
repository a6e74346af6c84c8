"""Weight formats: q4 (asymmetric 4-bit groups), q8 (symmetric int8 groups or rows), nf4 (bitsandbytes).

Layouts are fixed by docs/contracts.md (the Triton kernels read them directly):

- q4: ``qweight`` uint8 ``[N, K // 2]``; in each group of G input columns (bytes g*G/2 … g*G/2+G/2-1)
  byte i holds column g*G + i in its low nibble and column g*G + G/2 + i in its high nibble.
  ``scales``, ``mins`` fp16 ``[N, K // G]``; w = q * scale + min, q in 0..15.
  Bits per weight: 4 + 32/G (4.25 at G = 128, 4.5 at 64, 5.0 at 32).
- q8: ``qweight`` int8 ``[N, K]`` and ``scales`` fp16 ``[N, K // G]`` (one scale per group of G = 32, 64
  or 128 input columns; w = q * scales[n, k // G], q in -127..127; 8 + 16/G bits per weight, 8.125 at
  G = 128), or the older per-row layout ``scales`` ``[N]`` (w = q * scales[n]; 8 + 16/K bits, 8.0042 at
  K = 3840), which still loads and which ``quantize_q8(w)`` still writes by default. The two are told
  apart by the rank of ``scales``.
- nf4: bitsandbytes' own packing (``quantize_4bit(quant_type="nf4", blocksize=64)``), data uint8
  ``[N*K/2, 1]`` plus an fp32 absmax per 64 weights: 4 + 32/64 = 4.5 bits per weight; with double
  quant the absmax is stored as uint8 with one fp32 per 256 absmax: 4 + 8/64 + 32/(64*256)
  = 4.127 bits per weight (plus the per-tensor 16- and 256-entry code tables, not counted).

Quantization is data-free. For q4 each group's (scale, min) is searched to minimise the squared
reconstruction error: a grid of (offset, shrink) candidates of the min/max range is evaluated for
all groups at once, each candidate's rounded q gets a closed-form least-squares refit of (scale, min),
the best per group is kept, then a few alternating rounds (re-round q, refit) polish it. q8 does the
same per group (or row) for the clipping range of its symmetric scale. Rows are processed in chunks so memory
stays bounded; everything is plain torch, so CUDA tensors work unchanged.
"""

from __future__ import annotations

import torch

from olmo_local.errors import OlmoError

from ._bnb import bnb_functional

Q4_GROUP_SIZES = (32, 64, 128)
Q8_GROUP_SIZES = (32, 64, 128)  # q8 with per-group scales; 0 (or None) means one scale per output row
NF4_BLOCKSIZE = 64
_CHUNK_ELEMS = 1 << 20  # elements per row chunk in the searches (~4 MB fp32 per temporary)

# (offset of the low end as a fraction of the range, width of the 15 steps as a fraction of the range)
# The rounding assignment of each candidate is refit by least squares, so these only pick q.
_Q4_GRID = [(0.0, 1.0)] + [
    (off, w)
    for w in (0.98, 0.95, 0.92, 0.88, 0.84, 0.80, 0.75)
    for off in ((1.0 - w) * 0.5, 0.0, 1.0 - w)
]
_Q4_REFINE_ITERS = 3
# shrink factors of the absmax scale tried by the q8 search (255 levels rarely gain from clipping a
# Gaussian-like group, so most candidates sit close to 1; the low ones are for heavy tails)
_Q8_CLIPS = (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.92, 0.90, 0.86, 0.82, 0.78, 0.74, 0.70, 0.65, 0.60)


# --------------------------------------------------------------------------------------------- #
# bits per weight


def bits_per_weight(fmt: str, group_size: int = 128, in_features: int = 3840) -> float:
    """Exact storage bits per weight of a format (tensor-level code tables excluded).

    q4: 4 + 32/G. q8: 8 + 16/G with group_size G, 8 + 16/K (one fp16 scale per row of K) with
    group_size 0. nf4: 4 + 32/64 = 4.5.
    nf4-dq (double quant): 4 + 8/64 + 32/(64*256) = 4.126953125. bnb-int8: 8 + 32/K (fp32 SCB).
    bf16/fp16: 16, fp32: 32.
    """
    if fmt == "q4":
        if group_size not in Q4_GROUP_SIZES:
            raise OlmoError(f"q4 group size must be one of {Q4_GROUP_SIZES}, got {group_size}")
        return 4.0 + 32.0 / group_size
    if fmt == "q8":
        if group_size and group_size not in Q8_GROUP_SIZES:
            raise OlmoError(f"q8 group size must be one of {Q8_GROUP_SIZES} or 0 (per row), got {group_size}")
        return 8.0 + 16.0 / (group_size or in_features)
    if fmt == "nf4":
        return 4.0 + 32.0 / NF4_BLOCKSIZE
    if fmt in ("nf4-dq", "nf4dq"):
        return 4.0 + 8.0 / NF4_BLOCKSIZE + 32.0 / (NF4_BLOCKSIZE * 256)
    if fmt == "bnb-int8":
        return 8.0 + 32.0 / in_features
    if fmt in ("bf16", "fp16"):
        return 16.0
    if fmt == "fp32":
        return 32.0
    raise OlmoError(f"unknown weight format {fmt!r} (expected q4, q8, nf4, nf4-dq, bnb-int8, bf16)")


# --------------------------------------------------------------------------------------------- #
# q4 packing (contracts.md layout)


def pack_q4(q: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Pack q (integers 0..15, shape [N, K]) into uint8 [N, K // 2], group-split-half nibbles."""
    n, k = q.shape
    g = group_size
    if k % g or g % 2:
        raise OlmoError(f"q4: in_features {k} is not a multiple of the group size {g}")
    q = q.to(torch.uint8).reshape(n, k // g, g)
    packed = q[..., : g // 2] | (q[..., g // 2 :] << 4)
    return packed.reshape(n, k // 2).contiguous()


def unpack_q4(qweight: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of pack_q4: uint8 [N, K // 2] -> uint8 [N, K] with values 0..15."""
    n, kh = qweight.shape
    g = group_size
    p = qweight.reshape(n, (2 * kh) // g, g // 2)
    return torch.cat((p & 0x0F, p >> 4), dim=-1).reshape(n, 2 * kh)


# --------------------------------------------------------------------------------------------- #
# q4


def _check_weight(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise OlmoError(f"{what}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise OlmoError(f"{what}: expected a floating-point weight, got {w.dtype}")


def _lsq_fit(x: torch.Tensor, q: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, fallback_s: torch.Tensor):
    """Least-squares (scale, min) for x ≈ q*scale + min over the last dim, and its squared error."""
    n = x.shape[-1]
    sq = q.sum(-1)
    sqq = torch.linalg.vecdot(q, q)
    sxq = torch.linalg.vecdot(x, q)
    det = n * sqq - sq * sq
    ok = det > 0.5  # q not all equal (det is an integer-valued quantity >= n-1 otherwise)
    det_safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (n * sxq - sx * sq) / det_safe, fallback_s)
    m = torch.where(ok, (sqq * sx - sq * sxq) / det_safe, (sx - fallback_s * sq) / n)
    err = s * s * sqq + 2 * s * m * sq + n * m * m - 2 * s * sxq - 2 * m * sx + sxx
    return s, m, err


def _q4_search_chunk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [R, ng, G] -> (scale, min) fp32 [R, ng] minimising the squared error per group."""
    xmin = x.amin(-1)
    xmax = x.amax(-1)
    rng = xmax - xmin
    sx = x.sum(-1)
    sxx = torch.linalg.vecdot(x, x)
    # u in [0, 15]: position of each weight on the plain min/max grid
    inv = torch.where(rng > 0, 15.0 / rng, torch.zeros_like(rng))
    u = (x - xmin[..., None]) * inv[..., None]
    q = torch.empty_like(u)
    best_s = best_m = best_e = None
    for off, width in _Q4_GRID:
        # candidate grid: low end xmin + off*rng, step width*rng/15  ->  q = round((u - 15*off) / width)
        torch.mul(u, 1.0 / width, out=q).add_(-15.0 * off / width).round_().clamp_(0, 15)
        s, m, e = _lsq_fit(x, q, sx, sxx, rng * (width / 15.0))
        if best_e is None:
            best_s, best_m, best_e = s, m, e
        else:
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_m = torch.where(better, m, best_m)
            best_e = torch.where(better, e, best_e)
    for _ in range(_Q4_REFINE_ITERS):
        _q4_round(x, best_s, best_m, out=q)
        s, m, e = _lsq_fit(x, q, sx, sxx, best_s)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
        best_e = torch.where(better, e, best_e)
    return best_s, best_m


def _q4_round(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None):
    """Nearest q in 0..15 for x given per-group scale/min ([R, ng]); x is [R, ng, G]."""
    s_safe = torch.where(s != 0, s, torch.ones_like(s))
    inv = torch.where(s != 0, 1.0 / s_safe, torch.zeros_like(s))
    if out is None:
        out = torch.empty_like(x)
    torch.sub(x, m[..., None], out=out).mul_(inv[..., None]).round_().clamp_(0, 15)
    return out


def quantize_q4(w: torch.Tensor, group_size: int = 128, search: bool = True) -> dict[str, torch.Tensor]:
    """Quantize W [N, K] to q4 (4 + 32/G bits per weight): dict(qweight, scales, mins).

    With ``search=False`` this is plain round-to-nearest on each group's min/max range (baseline).
    """
    _check_weight(w, "q4")
    if group_size not in Q4_GROUP_SIZES:
        raise OlmoError(f"q4 group size must be one of {Q4_GROUP_SIZES}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise OlmoError(f"q4: in_features {k} is not a multiple of the group size {group_size}")
    ng = k // group_size
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, ng, dtype=torch.float16, device=w.device)
    mins = torch.empty(n, ng, dtype=torch.float16, device=w.device)
    rows = max(1, _CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):
        x = w[r0 : r0 + rows].float().reshape(-1, ng, group_size)
        if not torch.isfinite(x).all():
            raise OlmoError("q4: the weight contains NaN or Inf values; the checkpoint is corrupt")
        if search:
            s, m = _q4_search_chunk(x)
        else:
            m = x.amin(-1)
            s = (x.amax(-1) - m) / 15.0
        s16 = s.clamp(-65504, 65504).half()
        m16 = m.clamp(-65504, 65504).half()
        q = _q4_round(x, s16.float(), m16.float())
        qweight[r0 : r0 + rows] = pack_q4(q.reshape(-1, k), group_size)
        scales[r0 : r0 + rows] = s16
        mins[r0 : r0 + rows] = m16
    return {"qweight": qweight, "scales": scales, "mins": mins}


def dequantize_q4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q4 -> dense [N, K] in ``dtype`` (computed in fp32). group_size defaults to K / scales.shape[1]."""
    n, kh = qweight.shape
    k = 2 * kh
    g = group_size or k // scales.shape[1]
    q = unpack_q4(qweight, g).reshape(n, k // g, g).float()
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(n, k).to(dtype)


# --------------------------------------------------------------------------------------------- #
# q8


def q8_group_for(in_features: int, want: int | None) -> int:
    """The q8 group size used for a weight with ``in_features`` columns when ``want`` is asked for: the
    largest of 128/64/32 that is at most ``want`` and divides K, or 0 (one scale per row) when none
    does or ``want`` is 0/None."""
    if not want:
        return 0
    for g in sorted(Q8_GROUP_SIZES, reverse=True):
        if g <= want and in_features % g == 0:
            return g
    return 0


def q8_group_size(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """The group size of stored q8 tensors: 0 for per-row scales [N], else K // scales.shape[1]."""
    return 0 if scales.dim() == 1 else qweight.shape[1] // scales.shape[1]


def _q8_search_chunk(x: torch.Tensor) -> torch.Tensor:
    """x: fp32 [R, ng, G] -> scale fp32 [R, ng] minimising the squared error of round(x / s) * s per group.

    Candidates: the absmax scale shrunk by each of _Q8_CLIPS; each candidate's rounded q gets the
    least-squares scale sum(x*q) / sum(q*q), and the candidate with the lowest error is kept."""
    s = x.abs().amax(-1) / 127.0
    sxx = torch.linalg.vecdot(x, x)
    best_s, best_e = s, None
    q = torch.empty_like(x)
    for c in _Q8_CLIPS:
        cs = s * c
        inv = torch.where(cs > 0, 1.0 / torch.where(cs > 0, cs, torch.ones_like(cs)), 0.0)
        torch.mul(x, inv[..., None], out=q).round_().clamp_(-127, 127)
        sqq = torch.linalg.vecdot(q, q)
        sxq = torch.linalg.vecdot(x, q)
        ok = sqq > 0
        fit = torch.where(ok, sxq / torch.where(ok, sqq, torch.ones_like(sqq)), cs)
        e = sxx - torch.where(ok, sxq * fit, torch.zeros_like(sxq))
        if best_e is None:
            best_s, best_e = fit, e
        else:
            better = e < best_e
            best_s = torch.where(better, fit, best_s)
            best_e = torch.where(better, e, best_e)
    return best_s


def quantize_q8(w: torch.Tensor, search: bool = True,
                group_size: int | None = None) -> dict[str, torch.Tensor]:
    """Quantize W [N, K] to q8: dict(qweight int8 [N, K], scales fp16 [N, K // G]) with ``group_size`` G
    (8 + 16/G bits per weight), or scales fp16 [N] (one per output row, 8 + 16/K bits) when
    ``group_size`` is 0/None (the default).

    Symmetric; the clipping range of each group's (row's) scale is searched (least-squares refit per
    candidate) to minimise its squared error. ``search=False``: scale = absmax / 127.
    """
    _check_weight(w, "q8")
    n, k = w.shape
    g = group_size or 0
    if g and g not in Q8_GROUP_SIZES:
        raise OlmoError(f"q8 group size must be one of {Q8_GROUP_SIZES} or 0 (per row), got {g}")
    if g and k % g:
        raise OlmoError(f"q8: in_features {k} is not a multiple of the group size {g}")
    ng = k // g if g else 1
    qweight = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, ng, dtype=torch.float16, device=w.device)
    rows = max(1, _CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):
        x = w[r0 : r0 + rows].float()
        if not torch.isfinite(x).all():
            raise OlmoError("q8: the weight contains NaN or Inf values; the checkpoint is corrupt")
        x = x.reshape(x.shape[0], ng, k // ng)
        s = _q8_search_chunk(x) if search else x.abs().amax(-1) / 127.0
        s16 = s.clamp(0, 65504).half()
        sf = s16.float()
        inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, torch.ones_like(sf)), 0.0)
        q = (x * inv[..., None]).round_().clamp_(-127, 127)
        qweight[r0 : r0 + rows] = q.reshape(-1, k).to(torch.int8)
        scales[r0 : r0 + rows] = s16
    return {"qweight": qweight, "scales": scales if g else scales.reshape(n)}


def dequantize_q8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q8 -> dense [N, K] in ``dtype`` (computed in fp32); per-row scales [N] or group scales [N, K // G]."""
    if scales.dim() == 1:
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    n, k = qweight.shape
    ng = scales.shape[1]
    w = qweight.float().reshape(n, ng, k // ng) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


# --------------------------------------------------------------------------------------------- #
# nf4 (bitsandbytes)


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> dict:
    """Quantize W [N, K] with bitsandbytes nf4, blocksize 64 (4.5 bits per weight; 4.127 with
    double quant). Returns dict(qweight=uint8 [N*K/2, 1], quant_state=bitsandbytes QuantState).
    The QuantState's dtype is W's dtype (what transformers records for a bf16 model)."""
    bnbf = bnb_functional()

    _check_weight(w, "nf4")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    if not torch.isfinite(w).all():
        raise OlmoError("nf4: the weight contains NaN or Inf values; the checkpoint is corrupt")
    packed, qs = bnbf.quantize_4bit(
        w.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4"
    )
    return {"qweight": packed, "quant_state": qs}


def dequantize_nf4(qweight: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """nf4 -> dense weight in quant_state.dtype (like bitsandbytes' dequantize_4bit) unless ``dtype``.

    When the last dimension is not a multiple of the blocksize (blocks straddle rows) it is computed
    here in torch (``code[q] * absmax`` per block in fp32, rounded to the stored dtype): bitsandbytes
    0.50's CPU dequantize_4bit returns wrong values there."""
    qs = quant_state
    if int(qs.shape[-1]) % int(qs.blocksize) == 0:
        w = bnb_functional().dequantize_4bit(qweight, qs)
        return w if dtype is None else w.to(dtype)
    n = 1
    for d in qs.shape:
        n *= int(d)
    w = dequantize_4bit_range(qweight, nf4_absmax(qs), qs.code, int(qs.blocksize), 0, n)
    w = w.to(qs.dtype).reshape(qs.shape)
    return w if dtype is None else w.to(dtype)


def nf4_absmax(quant_state) -> torch.Tensor:
    """Per-block absmax as fp32, undoing bitsandbytes' double quantization if present."""
    qs = quant_state
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    scale = s2.absmax.float().repeat_interleave(int(s2.blocksize))[: qs.absmax.numel()]
    return s2.code.float()[qs.absmax.long()] * scale + float(qs.offset)


def dequantize_4bit_range(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          e0: int, e1: int) -> torch.Tensor:
    """Elements e0:e1 (flat order) of a bitsandbytes 4-bit tensor as fp32: byte i holds element 2i in
    its high nibble and 2i+1 in its low nibble; element j is code[q_j] * absmax[j // blocksize]."""
    flat = packed.reshape(-1)
    b0, b1 = e0 // blocksize, -(-e1 // blocksize)
    s = b0 * blocksize  # even: blocks start on byte boundaries
    e = min(b1 * blocksize, 2 * flat.numel())
    idx = torch.arange(256, device=code.device)
    lut = torch.stack((code.float()[idx >> 4], code.float()[idx & 15]), -1)  # byte -> its two values
    vals = lut[flat[s // 2: (e + 1) // 2].int()].reshape(-1)[: e - s]
    nb = b1 - b0
    if vals.numel() == nb * blocksize:
        vals = (vals.view(nb, blocksize) * absmax[b0:b1, None].float()).reshape(-1)
    else:  # the tensor's last, partial block
        vals = vals * absmax[b0:b1].float().repeat_interleave(blocksize)[: vals.numel()]
    return vals[e0 - s: e1 - s]
