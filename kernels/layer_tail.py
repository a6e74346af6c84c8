"""The tail of a decode layer in one persistent launch: output projection, norm and residual, gate|up,
SiLU·mul, down projection (and, for post-norm layers, the last norm and residual).

    layer_tail(y, o, gate_up, down, x, w1, eps1, w2, eps2, mode) -> (x_out, d)
      o, gate_up, down: (qweight, scales, mins) of q4 linears in the tiled layout, group size 128
      mode "pre"  (the GDN layers):       r = x + o(y);  h = rmsnorm(r, w1);  d = down(silu(g(h)) * u(h))
                                          -> (r, d): d is added by the next layer's norm (as before)
      mode "post" (the attention layers): r = x + rmsnorm(o(y), w1);  d = down(silu(g(r)) * u(r))
                                          -> (r + rmsnorm(d, w2), None)
Rounding as the separate ops do it (kernels.norm, gemv_q4): each projection's result is rounded to
bf16, the SiLU·mul is taken in fp32 from the fp32 sums and rounded, the norms are fp32 inside.

Status: correct (tests against the separate ops, on CUDA too) but slower, so the decode step keeps
the separate launches (DecodeStep.fuse_layer_tail = False). Measured on the H200 at 7B shapes
(scripts/gpu_tail_probe.py, 20 layers chained in a graph): 57.7-60.7 us per layer against 38.0-38.9 us
for the separate launches. Phase by phase (each alone, 264 programs): o 5.6-6.9 us (the separate GEMV:
6.1-7.0), norm + gate|up 31.5-32.0 (separate gate|up 15.6; the norm that every program recomputes and
writes costs the difference), SiLU·mul + down 11.4 (separate 10.1), the last step 1.9-4.0. So removing
the launches and the split-K second pass gains nothing: each GEMV is limited by the bytes a program
keeps in flight (one group of weights, registers being full), not by launch edges.

The idea, for the record: on the H200 a chained decode GEMV costs ~4-5 us beyond its bytes / bandwidth (the
7.9 MB attention o projection takes 6.1 us; scripts/gpu_floor_probe.py), while an empty launch costs
~0.6 us and a grid-wide barrier ~1 us. The cost is the critical path inside each GEMV: wait for the
predecessor, load x, the last group's loads, write the split-K partials, an atomic, the last program's
reads of the partials. Here the programs stay resident (two per SM) and walk the four steps with a
grid barrier between them; a GEMV's split-K partials are added straight into an fp32 vector (relaxed
atomic adds, no second pass), and the next step reads that vector after the barrier and applies the
pending epilogue (residual, norm, SiLU·mul) itself. Summation order of the split-K partials is
therefore not fixed (results may differ from run to run in the last bit of fp32 before rounding).

Phases (one launch on CUDA; PHASE=k runs phase k alone, which is how the interpreter runs it, since
its programs run one after another and could not meet at a barrier):
  1  zero acc_d; o projection -> acc_o (fp32 atomic adds)
  2  every program: the norm over the whole row from acc_o (its own copy; the row is ~4K values, read
     from L2) -> x_out (residual) and h (MLP input, bf16); gate|up projection of h -> acc_gu
  3  zero acc_o; per task: its K slice of silu(gate) * up from acc_gu -> din (bf16); down -> acc_d
  4  d = bf16(acc_d): "pre" writes d out, "post" adds rmsnorm(d, w2) to x_out; zero acc_gu
Writes of identical values by several programs (h, din) are benign: every program computes the same
bits from the same inputs. acc_o and acc_gu are left zeroed for the next launch (workspace contract);
acc_d, which every program reads in phase 4, is zeroed at the start of the next launch instead.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, cdiv, next_pow2, num_sms, pdl_kwargs, tl, triton, use_pdl, workspace
from .gemv_q4 import TILE_ROWS, q4_gemv_ref, q4_gemv_silu_mul_ref
from .norm import add_rmsnorm_ref, rmsnorm_add_ref

__all__ = ["layer_tail", "layer_tail_fits", "layer_tail_ref", "layer_tail_triton"]

MODES = {"pre": 1, "post": 2}
GROUP = 128
PER_SM = 2  # resident programs per SM (at most 255 registers x 128 threads each: two always fit)
BLOCK_N = 256  # output rows per GEMV task (4 warps x 64 rows: the wide q4 programs of gemv_q4)


# ----------------------------------------------------------------------------------------------
# torch reference: the separate ops, in the decode step's order
# ----------------------------------------------------------------------------------------------
def layer_tail_ref(y, o, gate_up, down, x, w1, eps1, w2=None, eps2=0.0, mode="pre", tiled=True):
    """(x_out, d) as documented above, from the reference ops (fp32 GEMVs, bf16 results)."""
    yo = q4_gemv_ref(y, *o, GROUP, tiled=tiled)
    if mode == "pre":
        h, r = add_rmsnorm_ref(yo, x, w1, eps1)
    else:
        r = rmsnorm_add_ref(yo, x, w1, eps1)
        h = r
    act = q4_gemv_silu_mul_ref(h, *gate_up, GROUP, tiled=tiled)
    d = q4_gemv_ref(act, *down, GROUP, tiled=tiled)
    if mode == "pre":
        return r, d
    return rmsnorm_add_ref(d, r, w2, eps2), None


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait
    from .gemv_q4 import _mma_acc, _mma_load, _pair

    @triton.jit
    def _grid_sync(cnt_ptr, target, ON: tl.constexpr):
        """All programs of the grid meet here (ON); the counter only grows within a launch: the k-th
        barrier waits for k * num_programs arrivals. Release / acquire at gpu scope order the data."""
        if ON:
            tl.debug_barrier()  # this program's stores and atomics come before its arrival
            tl.atomic_add(cnt_ptr, 1, sem="release")
            c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
            while c < target:
                c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
            tl.debug_barrier()

    @triton.jit
    def _zero_share(ptr, N, pid, P, BZ: tl.constexpr):
        """This program's share (1/P) of zeroing ptr[0:N]."""
        ch = tl.cdiv(N, P)
        lo = pid * ch
        hi = tl.minimum(lo + ch, N)
        for s in range(lo, hi, BZ):
            k = s + tl.arange(0, BZ)
            tl.store(ptr + k, tl.zeros([BZ], dtype=tl.float32), mask=k < hi)

    @triton.jit
    def _xw(xw_ptr, g, hw, G: tl.constexpr):
        """The four int32 words (bf16 pairs) of group g that each MMA lane needs (gemv_q4._x_words),
        read past L1: x was written in this launch."""
        xb = xw_ptr + g * (G // 2) + 2 * hw
        return (tl.load(xb, cache_modifier=".cg"), tl.load(xb + 1, cache_modifier=".cg"),
                tl.load(xb + G // 4, cache_modifier=".cg"), tl.load(xb + G // 4 + 1, cache_modifier=".cg"))

    @triton.jit
    def _gemv_first(qw_ptr, s_ptr, m_ptr, t, NT, NR, NGR, SPLIT, GPS,
                    G: tl.constexpr, BN: tl.constexpr, TR: tl.constexpr):
        """The first group's weights, scales and mins of task t (nothing is read when t >= NT): loaded
        before the barrier or wait that precedes the task, since no kernel writes weights."""
        HALF: tl.constexpr = BN // 2
        rows_a = (t // SPLIT) * BN + tl.arange(0, HALF)
        lim = tl.where(t < NT, NR, 0)
        return _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, HALF, lim, lim, NGR, (t % SPLIT) * GPS, G // 8, TR)

    @triton.jit
    def _gemv_phase(xw_ptr, qw_ptr, s_ptr, m_ptr, acc_ptr, pid, P, NT, NR, NGR, SPLIT, GPS,
                    n_wa, n_wb, n_sa, n_ma, n_sb, n_mb,
                    G: tl.constexpr, BN: tl.constexpr, TR: tl.constexpr, ASM: tl.constexpr):
        """This program's tasks pid, pid + P, ... of a GEMV with NT tasks; the first group of the first
        task arrives preloaded (_gemv_first), each later task's is loaded after the previous task."""
        for t in range(pid, NT, P):
            _gemv_task(xw_ptr, qw_ptr, s_ptr, m_ptr, acc_ptr, t, NR, NGR, SPLIT, GPS,
                       n_wa, n_wb, n_sa, n_ma, n_sb, n_mb, G, BN, TR, ASM)
            n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = _gemv_first(qw_ptr, s_ptr, m_ptr, t + P, NT, NR, NGR, SPLIT, GPS,
                                                             G, BN, TR)

    @triton.jit
    def _gemv_task(xw_ptr, qw_ptr, s_ptr, m_ptr, acc_ptr, t, NR, NGR, SPLIT, GPS,
                   n_wa, n_wb, n_sa, n_ma, n_sb, n_mb,
                   G: tl.constexpr, BN: tl.constexpr, TR: tl.constexpr, ASM: tl.constexpr):
        """Task t of a q4 GEMV (tensor-core path of gemv_q4, rows pid_n * BN .. + BN, groups of split
        pid_k), its first group's loads given: the partial row sums are added into acc (fp32) with
        relaxed atomics."""
        HW: tl.constexpr = G // 8
        HALF: tl.constexpr = BN // 2
        pid_n = t // SPLIT
        pid_k = t % SPLIT
        rows_a = pid_n * BN + tl.arange(0, HALF)
        hw = tl.arange(0, HW)
        ga = tl.zeros([HALF, HW], dtype=tl.float32)
        gb = tl.zeros([HALF, HW], dtype=tl.float32)
        g_begin = pid_k * GPS
        g_end = tl.minimum(g_begin + GPS, NGR)
        n_xa, n_xc, n_xd, n_xe = _xw(xw_ptr, g_begin, hw, G)
        for g in range(g_begin, g_end):  # next group's loads go out before this group's math
            wa, wb, sa, ma, sb, mb = n_wa, n_wb, n_sa, n_ma, n_sb, n_mb
            xa, xc, xd, xe = n_xa, n_xc, n_xd, n_xe
            lim = tl.where(g + 1 < g_end, NR, 0)
            n_wa, n_wb, n_sa, n_ma, n_sb, n_mb = _mma_load(qw_ptr, s_ptr, m_ptr, rows_a, HALF, lim, lim, NGR, g + 1,
                                                           HW, TR)
            n_xa, n_xc, n_xd, n_xe = _xw(xw_ptr, tl.minimum(g + 1, g_end - 1), hw, G)
            x0 = _pair(xa, xc, False, ASM)[None, :]
            x2 = _pair(xa, xc, True, ASM)[None, :]
            x1 = _pair(xd, xe, False, ASM)[None, :]
            x3 = _pair(xd, xe, True, ASM)[None, :]
            ga, gb = _mma_acc(ga, gb, wa, wb, sa, ma, sb, mb, x0, x1, x2, x3, ASM)
        tl.atomic_add(acc_ptr + rows_a, tl.sum(ga, 1) * 0.25, mask=rows_a < NR, sem="relaxed")
        tl.atomic_add(acc_ptr + rows_a + HALF, tl.sum(gb, 1) * 0.25, mask=rows_a + HALF < NR, sem="relaxed")

    @triton.jit
    def _layer_tail_kernel(
        yw_ptr, oq_ptr, os_ptr, om_ptr, gq_ptr, gs_ptr, gm_ptr, dq_ptr, ds_ptr, dm_ptr,
        x_ptr, w1_ptr, w2_ptr, xo_ptr, d_ptr, h_ptr, hw_ptr, din_ptr, dinw_ptr,
        acc_o, acc_gu, acc_d, cnt_ptr,
        D, KO, I, eps1, eps2,
        SO, GPSO, SG, GPSG, SD, GPSD,  # splits and groups per split of the three GEMVs
        MODE: tl.constexpr, PHASE: tl.constexpr, BD: tl.constexpr, G: tl.constexpr, BN: tl.constexpr,
        TR: tl.constexpr, ASM: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        SYNC: tl.constexpr = PHASE == 0
        NGO = KO // G
        NGD = I // G
        NGG = D // G
        NTO = SO * tl.cdiv(D, BN)
        NTG = SG * tl.cdiv(2 * I, BN)
        NTD = SD * tl.cdiv(D, BN)
        pdl_launch_dependents(USE_PDL)
        # 1: o projection (its first weights are loaded before waiting for the previous kernel)
        if PHASE == 0 or PHASE == 1:
            f0, f1, f2, f3, f4, f5 = _gemv_first(oq_ptr, os_ptr, om_ptr, pid, NTO, D, NGO, SO, GPSO, G, BN, TR)
            pdl_wait(USE_PDL)
            _zero_share(acc_d, D, pid, P, 256)
            _gemv_phase(yw_ptr, oq_ptr, os_ptr, om_ptr, acc_o, pid, P, NTO, D, NGO, SO, GPSO,
                        f0, f1, f2, f3, f4, f5, G, BN, TR, ASM)
        else:
            pdl_wait(USE_PDL)
        if PHASE == 0 or PHASE == 2:  # gate|up's first weights, before the barrier
            f0, f1, f2, f3, f4, f5 = _gemv_first(gq_ptr, gs_ptr, gm_ptr, pid, NTG, 2 * I, NGG, SG, GPSG, G, BN, TR)
        _grid_sync(cnt_ptr, P, SYNC)
        # 2: residual + norm (every program, whole row), gate|up projection
        if PHASE == 0 or PHASE == 2:
            d = tl.arange(0, BD)
            dm = d < D
            o = tl.load(acc_o + d, mask=dm, other=0.0, cache_modifier=".cg").to(tl.bfloat16).to(tl.float32)
            xr = tl.load(x_ptr + d, mask=dm, other=0.0).to(tl.float32)
            w1 = tl.load(w1_ptr + d, mask=dm, other=0.0).to(tl.float32)
            if MODE == 1:  # pre-norm: r = x + o, h = rmsnorm(r)
                r = (xr + o).to(tl.bfloat16).to(tl.float32)
                rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / D + eps1)
                h = (r * rstd * w1).to(tl.bfloat16)
            else:  # post-norm: r = x + rmsnorm(o), h = r
                rstd = 1.0 / tl.sqrt(tl.sum(o * o, axis=0) / D + eps1)
                r = (xr + (o * rstd * w1).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
                h = r.to(tl.bfloat16)
            tl.store(xo_ptr + d, r.to(tl.bfloat16), mask=dm)
            tl.store(h_ptr + d, h, mask=dm)
            tl.debug_barrier()  # h is read back below as words by other threads of this program
            _gemv_phase(hw_ptr, gq_ptr, gs_ptr, gm_ptr, acc_gu, pid, P, NTG, 2 * I, NGG, SG, GPSG,
                        f0, f1, f2, f3, f4, f5, G, BN, TR, ASM)
        if PHASE == 0 or PHASE == 3:  # down's first weights, before the barrier
            f0, f1, f2, f3, f4, f5 = _gemv_first(dq_ptr, ds_ptr, dm_ptr, pid, NTD, D, NGD, SD, GPSD, G, BN, TR)
        _grid_sync(cnt_ptr, 2 * P, SYNC)
        # 3: silu(gate) * up, down projection
        if PHASE == 0 or PHASE == 3:
            _zero_share(acc_o, D, pid, P, 256)
            for t in range(pid, NTD, P):
                g0 = (t % SD) * GPSD
                g1 = tl.minimum(g0 + GPSD, NGD)
                for g in range(g0, g1):
                    k = g * G + tl.arange(0, G)
                    gate = tl.load(acc_gu + k, cache_modifier=".cg")
                    up = tl.load(acc_gu + I + k, cache_modifier=".cg")
                    tl.store(din_ptr + k, (gate / (1.0 + tl.exp(-gate)) * up).to(tl.bfloat16))
                tl.debug_barrier()
                _gemv_task(dinw_ptr, dq_ptr, ds_ptr, dm_ptr, acc_d, t, D, NGD, SD, GPSD,
                           f0, f1, f2, f3, f4, f5, G, BN, TR, ASM)
                f0, f1, f2, f3, f4, f5 = _gemv_first(dq_ptr, ds_ptr, dm_ptr, t + P, NTD, D, NGD, SD, GPSD, G, BN, TR)
        _grid_sync(cnt_ptr, 3 * P, SYNC)
        # 4: the down projection's result; post-norm layers add its norm to the residual
        if PHASE == 0 or PHASE == 4:
            d = tl.arange(0, BD)
            dm = d < D
            ch = tl.cdiv(D, P)
            own = dm & (d >= pid * ch) & (d < pid * ch + ch)
            dv = tl.load(acc_d + d, mask=dm, other=0.0, cache_modifier=".cg").to(tl.bfloat16)
            if MODE == 1:
                tl.store(d_ptr + d, dv, mask=own)
            else:
                dvf = dv.to(tl.float32)
                w2 = tl.load(w2_ptr + d, mask=dm, other=0.0).to(tl.float32)
                rstd = 1.0 / tl.sqrt(tl.sum(dvf * dvf, axis=0) / D + eps2)
                nd = (dvf * rstd * w2).to(tl.bfloat16).to(tl.float32)
                r = tl.load(xo_ptr + d, mask=own, other=0.0, cache_modifier=".cg").to(tl.float32)
                tl.store(xo_ptr + d, (r + nd).to(tl.bfloat16), mask=own)
            _zero_share(acc_gu, 2 * I, pid, P, 256)
        if SYNC:  # the last program out resets the barrier counter for the next launch
            if tl.atomic_add(cnt_ptr + 1, 1) == P - 1:
                tl.atomic_xchg(cnt_ptr, 0)
                tl.atomic_xchg(cnt_ptr + 1, 0)


def _splits(nr: int, ngr: int, programs: int, bn: int) -> tuple[int, int]:
    """(splits, groups per split) for a GEMV of nr rows and ngr groups: about one task per program."""
    nblk = cdiv(nr, bn)
    split = max(1, min(programs // nblk, ngr))
    gps = cdiv(ngr, split)
    return cdiv(ngr, gps), gps


_RESIDENT: dict[tuple, int] = {}
INFO: dict[tuple, dict] = {}  # what the residency check found (registers, shared memory), for scripts


def _resident_programs(dev: torch.device, args: tuple, kwargs: dict) -> int:
    """Programs of the one-launch kernel that fit on the device at once (all must be resident to meet at
    the grid barriers): PER_SM per SM unless its registers or shared memory allow fewer. Compiled once
    per specialisation (Triton's warmup); if that is unavailable, one program per SM (always fits)."""
    key = (str(dev), kwargs["MODE"], kwargs["BD"], kwargs["BN"])
    if key not in _RESIDENT:
        sms = num_sms(dev)
        per_sm = 1
        try:
            k = _layer_tail_kernel.warmup(*args, grid=(sms,), **kwargs)
            if hasattr(k, "_init_handles"):  # Triton 3.x loads the binary (and its register count) lazily
                k._init_handles()
            regs = max(1, int(k.n_regs))
            shared = int(getattr(k.metadata, "shared", 0) or 0)
            props = torch.cuda.get_device_properties(dev)
            smem = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 0)
            if not smem:  # KB per SM by compute capability (CUDA guide), 100 KB when unknown
                smem = {(9, 0): 228, (8, 0): 164, (8, 7): 164}.get((props.major, props.minor), 100) * 1024
            by_regs = 65536 // (-(-regs // 8) * 8 * 32 * kwargs["num_warps"])
            by_smem = smem // (shared + 1024)
            per_sm = max(1, min(PER_SM, by_regs, by_smem))
            INFO[key] = dict(regs=regs, spills=int(getattr(k, "n_spills", -1)), shared=shared, smem_per_sm=smem,
                             by_regs=by_regs, by_smem=by_smem)
        except Exception as exc:  # noqa: BLE001  (no warmup API: the safe count)
            per_sm = 1
            INFO[key] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
        _RESIDENT[key] = per_sm * sms
    return _RESIDENT[key]


def layer_tail_fits(y: torch.Tensor, o, gate_up, down, x: torch.Tensor) -> bool:
    """Whether layer_tail_triton takes these operands: one bf16 row, q4 linears of group 128 whose rows
    are whole slabs of the tiled layout, widths that are whole groups."""
    if not HAS_TRITON or y.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
        return False
    if y.numel() % GROUP or x.numel() % GROUP or x.numel() > 16384:
        return False
    d, ko = x.numel(), y.numel()
    i2 = gate_up[0].shape[0]
    if i2 % 2 or (i2 // 2) % GROUP:
        return False
    shapes = ((o, d, ko), (gate_up, i2, d), (down, d, i2 // 2))
    for (qw, s, _m), n, k in shapes:
        if tuple(qw.shape) != (n, k // 2) or s.shape[-1] != k // GROUP or n % TILE_ROWS:
            return False
    return True


def layer_tail_triton(y, o, gate_up, down, x, w1, eps1, w2=None, eps2=0.0, mode="pre", *,
                      programs=None, block_n=None, phased=None, phases=None):
    """The one-launch layer tail (see the module docstring); o, gate_up, down in the tiled q4 layout.
    programs / block_n / phased (one launch per phase, no barriers) are test and tuning knobs;
    phased is forced under the interpreter."""
    if not layer_tail_fits(y, o, gate_up, down, x):
        raise ValueError("layer_tail: operands outside the fused kernel's shapes (bf16 row, q4 g128, tiled)")
    dev = x.device
    d, ko, i = x.numel(), y.numel(), gate_up[0].shape[0] // 2
    bn = block_n or BLOCK_N
    phased = INTERPRET if phased is None else (phased or INTERPRET)
    y = y.reshape(-1).contiguous()
    x = x.reshape(-1).contiguous()
    xo = torch.empty_like(x)
    dout = torch.empty_like(x)
    h = workspace("tail_h", (d,), torch.bfloat16, dev)
    din = workspace("tail_din", (i,), torch.bfloat16, dev)
    acc_o = workspace("tail_acc_o", (d,), torch.float32, dev)
    acc_gu = workspace("tail_acc_gu", (2 * i,), torch.float32, dev)
    acc_d = workspace("tail_acc_d", (d,), torch.float32, dev)
    cnt = workspace("tail_cnt", (2,), torch.int32, dev)
    w2 = w1 if w2 is None else w2
    pdl = use_pdl(x) and not phased
    tensors = (y.view(torch.int32), o[0].view(torch.int32), o[1], o[2], gate_up[0].view(torch.int32), gate_up[1],
               gate_up[2], down[0].view(torch.int32), down[1], down[2],
               x, w1, w2, xo, dout, h, h.view(torch.int32), din, din.view(torch.int32), acc_o, acc_gu, acc_d, cnt)
    consts = dict(MODE=MODES[mode], BD=next_pow2(d), G=GROUP, BN=bn, TR=TILE_ROWS, ASM=x.is_cuda, USE_PDL=pdl,
                  num_warps=4, **pdl_kwargs(pdl))

    def scalars(p: int) -> tuple:
        return (d, ko, i, float(eps1), float(eps2), *_splits(d, ko // GROUP, p, bn), *_splits(2 * i, d // GROUP, p, bn),
                *_splits(d, i // GROUP, p, bn))

    p = programs or PER_SM * num_sms(dev)
    if not (programs or phased):
        p = _resident_programs(dev, tensors + scalars(p), dict(consts, PHASE=0))
    for phase in (phases or ((1, 2, 3, 4) if phased else (0,))):  # phases: timing scripts only
        _layer_tail_kernel[(p,)](*tensors, *scalars(p), PHASE=phase, **consts)
    return (xo.view(1, -1), dout.view(1, -1)) if mode == "pre" else (xo.view(1, -1), None)


def layer_tail(y, o, gate_up, down, x, w1, eps1, w2=None, eps2=0.0, mode="pre"):
    """Dispatch: the fused launch for CUDA operands it fits, the reference ops otherwise."""
    if x.is_cuda and HAS_TRITON and layer_tail_fits(y, o, gate_up, down, x):
        return layer_tail_triton(y, o, gate_up, down, x, w1, eps1, w2, eps2, mode)
    r, dd = layer_tail_ref(y, o, gate_up, down, x.reshape(1, -1), w1, eps1, w2, eps2, mode)
    return r.reshape(1, -1), (dd.reshape(1, -1) if dd is not None else None)
