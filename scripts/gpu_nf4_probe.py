#!/usr/bin/env python
"""The fused nf4 GEMV (kernels.gemv_nf4) at the 7B projections' shapes, blocksize 64: us per launch (20 per
PDL graph, weights rotating over enough copies to leave L2), GB/s and the ratio to a device copy, for the
default launch and a few row-block / word-block / warp settings; the relative error against the reference.

    python scripts/gpu_nf4_probe.py
"""

from __future__ import annotations

import torch

from olmo_local.kernels import gemv_nf4 as kn

from gpu_floor_probe import timed
from gpu_gemv_tiled_sweep import copy_bw

SHAPES = [("gdn_in", 17280, 3840), ("gate_up", 2 * 11008, 3840), ("down", 3840, 11008), ("gdn_o", 3840, 5760)]
CONFIGS = [("default", {}), ("gathers", dict(lookup=False)), ("BN 32", dict(block_n=32)),
           ("BN 128", dict(block_n=128)), ("BW 8", dict(block_w=8)), ("BW 32", dict(block_w=32)),
           ("8 warps BN 128", dict(block_n=128, num_warps=8)), ("BN 32 BW 32", dict(block_n=32, block_w=32))]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    code = torch.linspace(-1, 1, 16, device="cuda")
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    print(f"{'gemv':8s} {'config':18s} {'us':>7s} {'GB/s':>6s} {'% copy':>7s} {'relerr':>8s}")
    for name, n, k in SHAPES:
        nbytes = n * k // 2 + 4 * n * k // 64
        copies = max(2, -(-160_000_000 // nbytes))
        ws = [(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda", generator=gen),
               torch.rand(n * k // 64, device="cuda", generator=gen) * 0.1) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        ref = kn.nf4_gemv_ref(x.float(), ws[0][0], ws[0][1], code, 64, n)
        for label, kw in CONFIGS:
            it = [0]

            def fn():
                p, a = ws[it[0] % copies]
                it[0] += 1
                kn.nf4_gemv_triton(x, p, a, code, 64, n, out, **kw)

            launches = copies * -(-20 // copies)
            us = timed(fn, launches) / launches
            kn.nf4_gemv_triton(x, ws[0][0], ws[0][1], code, 64, n, out, **kw)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            gbs = nbytes / us / 1e3
            print(f"{name:8s} {label:18s} {us:7.2f} {gbs:6.0f} {gbs * 1e9 / bw * 100:6.1f}% {err:8.1e}")


if __name__ == "__main__":
    main()
