#!/usr/bin/env python
"""Per-layer time of the decode layer tail at 7B shapes on this GPU: the separate launches (q4 o GEMV,
norm, gate|up + SiLU·mul GEMV, down GEMV, and the post-norm) against kernels.layer_tail's one
persistent launch, each chained 20x in a CUDA graph (PDL on, as in the decode step); also the
resident program count the kernel picked and its registers.

    python scripts/gpu_tail_probe.py
"""

from __future__ import annotations

import torch

from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels import layer_tail as lt
from olmo_local.kernels.norm import add_rmsnorm, rmsnorm_add

from gpu_floor_probe import timed


def q4(n: int, k: int, gen: torch.Generator):
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    s = (torch.rand(n, k // 128, device="cuda", generator=gen) * 1e-3).half()
    m = (-torch.rand(n, k // 128, device="cuda", generator=gen) * 8e-3).half()
    return k4.q4_tile(qw, s, m, 128)


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    d, i = 3840, 11008
    print(torch.cuda.get_device_name())
    print(f"{'layer tail':34s} {'separate us':>12s} {'one launch us':>14s} {'saved':>7s}")
    for name, ko, mode in (("GDN (o 5760, pre-norm)", 5760, "pre"), ("attention (o 3840, post-norm)", 3840, "post")):
        o, gu, dn = q4(d, ko, gen), q4(2 * i, d, gen), q4(d, i, gen)
        y = torch.randn(1, ko, device="cuda", generator=gen).to(torch.bfloat16)
        x = torch.randn(1, d, device="cuda", generator=gen).to(torch.bfloat16)
        w = torch.ones(d, device="cuda", dtype=torch.bfloat16)

        def separate():
            yo = k4.q4_gemv_triton(y, *o, 128, tiled=True)
            if mode == "pre":
                h, r = add_rmsnorm(yo, x, w, 1e-6)
            else:
                h = r = rmsnorm_add(yo, x, w, 1e-6)
            a = k4.q4_gemv_silu_mul_triton(h, *gu, 128, tiled=True)
            dd = k4.q4_gemv_triton(a, *dn, 128, tiled=True)
            if mode == "post":
                rmsnorm_add(dd, r, w, 1e-6)

        def fused():
            lt.layer_tail_triton(y, o, gu, dn, x, w, 1e-6, w, 1e-6, mode)

        a = timed(separate, 20) / 20
        b = timed(fused, 20) / 20
        print(f"{name:34s} {a:12.2f} {b:14.2f} {a - b:7.2f}")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for per_sm in (1, 2):
            p = per_sm * sms
            us = timed(lambda: lt.layer_tail_triton(y, o, gu, dn, x, w, 1e-6, w, 1e-6, mode, programs=p), 20) / 20
            print(f"{'  programs=' + str(p):34s} {'':12s} {us:14.2f} {a - us:7.2f}")
        for ph in (1, 2, 3, 4):  # each phase alone (no barriers), 2 programs per SM
            us = timed(lambda: lt.layer_tail_triton(y, o, gu, dn, x, w, 1e-6, w, 1e-6, mode, programs=2 * sms,
                                                    phases=(ph,)), 20) / 20
            print(f"{'  phase ' + str(ph) + ' alone':34s} {'':12s} {us:14.2f}")
    print("resident programs:", lt._RESIDENT, lt.INFO)


if __name__ == "__main__":
    main()
