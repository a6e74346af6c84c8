#!/usr/bin/env python
"""Per-GEMV speed of the 7B decode projections (tiled q4 layout, tensor-core path) on this GPU, for a
few launch configurations: 20 launches of one GEMV chained in a CUDA graph (PDL on, as in the decode
step), the mean per launch, its weight bytes per second and the ratio to a device copy.

    python scripts/gpu_gemv_tiled_sweep.py [--quick]
"""

from __future__ import annotations

import itertools
import sys

import torch

from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels._triton import num_sms

from gpu_floor_probe import random_q4_tiled, timed as timed_replay

SHAPES = [("gdn_in", 17280, 3840, False), ("qkv", 11520, 3840, False), ("gate_up", 2 * 11008, 3840, True),
          ("down", 3840, 11008, False), ("gdn_o", 3840, 5760, False), ("attn_o", 3840, 3840, False)]


def copy_bw() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = 1e9
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() / best


def timed(fn, n=20, reps=10) -> float:
    """us per launch: n launches of fn chained in one CUDA graph, best of reps replays."""
    return timed_replay(fn, n, reps) / n


def main() -> None:
    quick = "--quick" in sys.argv
    bw = copy_bw()
    sms = num_sms(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, {sms} SMs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n, k, gated in SHAPES:
        qw, s, m = random_q4_tiled(n, k, gen)
        x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        nbytes = qw.numel() + 2 * s.numel() * 2
        kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
        out = torch.empty(1, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
        base = None
        splits = [None] if quick else [None, "x0.33", "x0.5", "x0.67", "x1.5"]
        for rpw, warps, split in itertools.product((16, 32, 64), (4, 8), splits):
            if "--wide" in sys.argv and (rpw, warps, split) != (16, 4, None):
                continue
            if (quick and (rpw, warps) != (16, 4)) or (rpw == 64 and warps == 8):
                continue
            k4.DEFAULT_MMA_ROWS_PER_WARP = rpw
            sk = None
            if split is not None:
                bn = rpw * warps // (2 if gated else 1)
                nb = -(-(n // 2 if gated else n) // bn)
                d = k4._pick_split(nb, k // 128, torch.device("cuda"))
                sk = max(1, round(d * float(split[1:])))
            try:
                us = timed(lambda: kern(x, qw, s, m, 128, out, tiled=True, num_warps=warps, split_k=sk))
            except Exception as exc:  # noqa: BLE001
                print(f"{name} rpw{rpw} w{warps} split {split}: {type(exc).__name__} {str(exc)[:120]}")
                continue
            base = base or us
            rows.append((name, f"rpw{rpw} w{warps} split {split or 'default'}", us, nbytes / us / 1e3, us / base))
        k4.DEFAULT_MMA_ROWS_PER_WARP = 16
        for per_sm in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0):  # the wide rule at several programs per SM
            k4.WIDE_PROGRAMS = True
            k4.WIDE_PER_SM = k4.WIDE_PER_SM_GATED = per_sm
            us = timed(lambda: kern(x, qw, s, m, 128, out, tiled=True))
            rows.append((name, f"wide rule {per_sm}/SM", us, nbytes / us / 1e3, us / base))
        k4.WIDE_PROGRAMS = False
    print(f"{'gemv':8s} {'config':28s} {'us':>7s} {'GB/s':>7s} {'% copy':>7s} {'vs def':>7s}")
    for name, cfg, us, gbs, rel in rows:
        print(f"{name:8s} {cfg:28s} {us:7.2f} {gbs:7.0f} {gbs * 1e9 / bw * 100:6.1f}% {rel:7.2f}")


if __name__ == "__main__":
    main()
