#!/usr/bin/env python
"""What the fused GDN decode step costs after the 7B in-projection, per launch configuration: 20 pairs
(q4 in-projection GEMV, GDN step) chained in a CUDA graph (PDL on, as in the decode step), minus 20
in-projections alone; also the step chained after itself.

    python scripts/gpu_gdn_step_probe.py
"""

from __future__ import annotations

import torch

from olmo_local.kernels import gdn_decode as kg
from olmo_local.kernels import gemv_q4 as k4

from gpu_floor_probe import random_q4_tiled, timed

HK = HV = 30
DK, DV, KC, D = 96, 192, 4, 3840


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    n_in = 2 * HK * DK + 2 * HV * DV
    qw, s, m = random_q4_tiled(n_in, D, gen)
    u = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
    proj = torch.empty(1, n_in, device=dev, dtype=torch.bfloat16)
    c = 2 * HK * DK + HV * DV
    qkv, z = proj[0].split([c, HV * DV])
    cw = (torch.randn(c, KC, device=dev, generator=gen) * 0.5).to(torch.bfloat16)
    cs = torch.randn(c, KC - 1, device=dev, generator=gen).to(torch.bfloat16)
    a_log = torch.rand(HV, device=dev, generator=gen) * 2 - 1
    dtb = torch.randn(HV, device=dev, generator=gen) * 0.5
    nw = torch.ones(DV, device=dev, dtype=torch.bfloat16)
    rs = torch.randn(HV, DK, DV, device=dev, generator=gen) * 0.3
    w_ab = (torch.randn(2 * HV, D, device=dev, generator=gen) * D ** -0.5).to(torch.bfloat16)
    ab = torch.randn(2 * HV, device=dev, generator=gen)
    out = torch.empty(HV * DV, device=dev, dtype=torch.bfloat16)

    def gemv():
        k4.q4_gemv_triton(u, qw, s, m, 128, proj, tiled=True)

    def step(**kw):
        fused = kw.pop("fused", True)
        st = kw.pop("state", rs)
        if fused:
            kg.gdn_decode_step_triton(qkv, z, None, None, cw, cs, a_log, dtb, nw, st, True, out,
                                      ab_from=(u.view(-1), w_ab), **kw)
        else:
            kg.gdn_decode_step_triton(qkv, z, ab[:HV], ab[HV:], cw, cs, a_log, dtb, nw, st, True, out, **kw)

    n = 20
    base = timed(gemv, n) / n
    print(f"{torch.cuda.get_device_name()}: in-projection alone {base:.2f} us")
    print(f"{'variant':<40}{'after GEMV us':>14}{'chained us':>12}")
    rs_t = rs.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, dk contiguous in memory
    variants = [("ab once, bv64 w8", dict()), ("ab given, bv64 w8", dict(fused=False)),
                ("ab given, bv16 w1", dict(fused=False, block_v=16, num_warps=1)),
                ("ab given, bv16 w2", dict(fused=False, block_v=16, num_warps=2)),
                ("ab given, bv32 w2", dict(fused=False, block_v=32, num_warps=2)),
                ("ab given, bv32 w4", dict(fused=False, block_v=32, num_warps=4)),
                ("ab loop, bv16 w1", dict(ab_once_max=0, block_v=16, num_warps=1)),
                ("ab loop, bv16 w2", dict(ab_once_max=0, block_v=16, num_warps=2)),
                ("ab once, bv64 w8, state dk-major", dict(state=rs_t)),
                ("ab given, bv16 w1, state dk-major", dict(fused=False, block_v=16, num_warps=1, state=rs_t)),
                ("ab given, bv16 w2, state dk-major", dict(fused=False, block_v=16, num_warps=2, state=rs_t)),
                ("ab once, bv64 w8", dict())]
    for name, kw in variants:
        pair = timed(lambda: (gemv(), step(**dict(kw))), n) / n
        alone = timed(lambda: step(**dict(kw)), n) / n
        print(f"{name:<40}{pair - base:>14.2f}{alone:>12.2f}")


if __name__ == "__main__":
    main()
