#!/usr/bin/env python
"""Is a wide q4 GEMV program's time set by its groups (per-program latency) or by the bytes of the
whole launch (bandwidth)? Times wide tensor-core GEMVs (256 rows, 4 warps, tiled layout) at a fixed
number of programs with fewer groups each, and at a fixed number of groups with more programs. The
weights rotate over enough copies to leave L2 (the 7B projections are 8-45 MB; H200 L2 is ~50 MB).
Each row: 20 launches PDL-chained in one graph, best of 10 replays, us per launch.

    python scripts/gpu_gps_probe.py
"""

from __future__ import annotations

import torch

from olmo_local.kernels import gemv_q4 as k4

from gpu_floor_probe import random_q4_tiled, timed

# (label, rows, cols, split_k): programs = ceil(rows / 256) * split, groups per program = cols / 128 / split
CASES = [
    ("gdn_in as now", 17280, 3840, 3),  # 68 x 3 = 204 programs x 10 groups
    ("gdn_in 8 groups", 17280, 3072, 3),  # 204 x 8
    ("gdn_in stream-K like", 16128, 4096, 4),  # 63 x 4 = 252 x 8, same bytes within 0.5 %
    ("gdn_in 264 x 10", 16896, 5120, 4),  # 66 x 4 = 264 x 10
    ("down as now", 3840, 11008, 15),  # 15 x 15 = 225 x 6 (split 17 rounds to 15)
    ("down stream-K like", 3840, 10880, 17),  # 255 x 5
    ("down 225 x 5", 3840, 9600, 15),  # 225 x 5
    ("qkv as now", 11520, 3840, 5),  # 45 x 5 = 225 x 6
    ("gdn_o as now", 3840, 5760, 15),  # 225 x 3
]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}")
    print(f"{'case':22s} {'progs':>5s} {'grp/p':>5s} {'MB':>6s} {'us':>7s} {'us/grp':>7s} {'GB/s':>6s}")
    for label, n, k, split in CASES:
        ngr = k // 128
        gps = -(-ngr // split)
        nbytes = n * k // 2 + 2 * 2 * n * ngr
        copies = max(2, -(-160_000_000 // nbytes))
        ws = [random_q4_tiled(n, k, gen) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        it = [0]

        def fn():
            qw, s, m = ws[it[0] % copies]
            it[0] += 1
            k4.q4_gemv_triton(x, qw, s, m, 128, out, tiled=True, block_n=256, num_warps=4, split_k=split)

        launches = copies * -(-20 // copies)  # every copy equally often
        us = timed(fn, launches) / launches
        progs = -(-n // 256) * -(-ngr // gps)
        print(f"{label:22s} {progs:5d} {gps:5d} {nbytes / 1e6:6.1f} {us:7.2f} {us / gps:7.2f} {nbytes / us / 1e3:6.0f}")


if __name__ == "__main__":
    main()
