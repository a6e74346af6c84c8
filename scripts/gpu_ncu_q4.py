#!/usr/bin/env python
"""A few GEMV launches for Nsight Compute to profile (run under `ncu`, see scripts/gpu_check.sh ncu):
q4 gdn_in 3840x17280 on tensor cores (prefetch on and off) and on the fp32 path, and the q8 lm_head
at block_k=256 (the config that streams at copy bandwidth) as the reference."""

import torch

from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels import gemv_q8 as k8

g = torch.Generator(device="cuda").manual_seed(0)
n, k = 17280, 3840
qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=g)
s = (torch.rand(n, k // 128, device="cuda", generator=g) * 1e-2).half()
m = (-torch.rand(n, k // 128, device="cuda", generator=g) * 1e-1).half()
x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
runs = [("mma_prefetch", dict(mma=True, prefetch=True)), ("mma_noprefetch", dict(mma=True, prefetch=False)),
        ("fp32", dict(mma=False))]
for name, kw in runs:
    for _ in range(3):
        k4.q4_gemv_triton(x, qw, s, m, 128, **kw)
torch.cuda.synchronize()
q8w = torch.randint(-127, 128, (100352, k), dtype=torch.int8, device="cuda", generator=g)
q8s = (torch.rand(100352, device="cuda", generator=g) * 1e-3).half()
for _ in range(2):
    try:
        k8.q8_gemv_triton(x, q8w, q8s, block_n=32, block_k=256)
    except TypeError:
        k8.q8_gemv_triton(x, q8w, q8s)
torch.cuda.synchronize()
print("done")
