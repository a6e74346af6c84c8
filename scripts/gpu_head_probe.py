#!/usr/bin/env python
"""The q8 lm_head (3840 x 100352, group 128) alone: us per launch (20 launches PDL-free in one graph, best
of 10 replays; 386 MB, so L2 holds none of it) at the default launch and a few row-block sizes and warp
counts, with GB/s and the ratio to a device copy. (Session 8 also timed K blocks of two groups here:
122 vs 109 us, removed.)

    python scripts/gpu_head_probe.py
"""

from __future__ import annotations

import torch

from olmo_local.kernels import gemv_q8 as k8

from gpu_floor_probe import timed
from gpu_gemv_tiled_sweep import copy_bw


def main() -> None:
    n, k, g = 100352, 3840, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
    s = (torch.rand(n, k // g, device="cuda", generator=gen) * 1e-2).half()
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    ref = k8.q8_gemv_ref(x.float(), q, s)
    bw = copy_bw()
    nbytes = q.numel() + 2 * s.numel()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    print(f"{'config':34s} {'us':>7s} {'GB/s':>6s} {'% copy':>7s} {'relerr':>8s}")
    for label, kw in [("default", {}), ("BN 64 (8 KB tiles)", dict(block_n=64)), ("BN 128", dict(block_n=128)),
                      ("BN 256", dict(block_n=256)), ("BN 128, 8 warps", dict(block_n=128, num_warps=8)),
                      ("BN 256, 8 warps", dict(block_n=256, num_warps=8))]:
        us = timed(lambda: k8.q8_gemv_triton(x, q, s, out, **kw), 20) / 20
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"{label:34s} {us:7.2f} {nbytes / us / 1e3:6.0f} {nbytes / us / 1e3 * 1e9 / bw * 100:6.1f}% {err:8.1e}")

if __name__ == "__main__":
    main()
