#!/usr/bin/env python
"""Launches for Nsight Compute: the 7B gdn_in and gate|up q4 GEMVs in the tiled layout with the decode
defaults (tensor cores, hand prefetch, default split-K), three each."""

import torch

from olmo_local.kernels import gemv_q4 as k4

g = torch.Generator(device="cuda").manual_seed(0)
for n, k, gated in ((17280, 3840, False), (2 * 11008, 3840, True)):
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=g)
    s = (torch.rand(n, k // 128, device="cuda", generator=g) * 1e-2).half()
    m = (-torch.rand(n, k // 128, device="cuda", generator=g) * 1e-1).half()
    qw, s, m = k4.q4_tile(qw, s, m, 128)
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    for _ in range(3):
        kern(x, qw, s, m, 128, tiled=True)
torch.cuda.synchronize()
print("done")
