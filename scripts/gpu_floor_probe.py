#!/usr/bin/env python
"""Where a decode kernel's fixed cost comes from, on this GPU (timing only, nothing is checked):

  empty  : N empty Triton kernels (grid P, 4 warps) chained in a CUDA graph, PDL on / off -> us per launch
  barrier: one persistent kernel with N grid-wide barriers (atomic counter + spin)          -> us per barrier
  gemv   : the 7B attention o projection (q4, tiled) chained 20x, default launch           -> us per GEMV

    python scripts/gpu_floor_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels._triton import num_sms, pdl_launch_dependents, pdl_wait


def random_q4_tiled(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q4 weights [n, k] (G = 128) in the tiled GPU layout, as the probes time them: (qweight,
    scales, mins) on CUDA."""
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    s = (torch.rand(n, k // 128, device="cuda", generator=gen) * 1e-2).half()
    m = (-torch.rand(n, k // 128, device="cuda", generator=gen) * 1e-1).half()
    return k4.q4_tile(qw, s, m, 128)


@triton.jit
def _empty(x_ptr, USE_PDL: tl.constexpr):
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    if tl.program_id(0) == 1 << 30:  # never: keeps the argument alive
        tl.store(x_ptr, 0.0)


@triton.jit
def _barriers(cnt_ptr, NB):
    """NB grid-wide barriers: the k-th waits for k * num_programs arrivals (release add, acquire spin)."""
    n = tl.num_programs(0)
    for i in range(NB):
        tl.debug_barrier()  # this program's work comes before its arrival
        tl.atomic_add(cnt_ptr, 1, sem="release")
        c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        while c < n * (i + 1):
            c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        tl.debug_barrier()


def timed(fn, n: int, reps: int = 10, pre=None) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                if pre is not None:
                    pre()
                fn()
    g.replay()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) * 1e3)
    return best  # us per replay


def main() -> None:
    sms = num_sms(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: {sms} SMs")
    x = torch.zeros(1, device="cuda")
    rows = []
    for p in (sms, 2 * sms):
        for pdl in (False, True):
            kw = {"launch_pdl": True} if pdl else {}
            us = timed(lambda: _empty[(p,)](x, USE_PDL=pdl, num_warps=4, **kw), 200) / 200
            rows.append((f"empty P={p} pdl={int(pdl)}", us))
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    for p in (sms, 2 * sms):
        t = {}
        for nb in (1, 33):
            t[nb] = timed(lambda: _barriers[(p,)](cnt, nb, num_warps=4), 20, pre=cnt.zero_) / 20
        rows.append((f"barrier P={p} (1 barrier kernel)", t[1]))
        rows.append((f"barrier P={p} per extra barrier", (t[33] - t[1]) / 32))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in (("attn_o", 3840, 3840), ("gdn_o", 3840, 5760), ("down", 3840, 11008), ("tiny", 256, 256)):
        qw, s, m = random_q4_tiled(n, k, gen)
        xin = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        for sk in (None, 1):
            us = timed(lambda: k4.q4_gemv_triton(xin, qw, s, m, 128, out, tiled=True, split_k=sk), 20) / 20
            rows.append((f"gemv {name} {n}x{k} split {sk or 'default'}", us))
    print(f"{'probe':44s} {'us':>8s}")
    for name, us in rows:
        print(f"{name:44s} {us:8.2f}")


if __name__ == "__main__":
    main()
