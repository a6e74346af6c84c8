#!/usr/bin/env python
"""GPU check without pytest: Q4Linear prefill in row blocks equals the one-block GEMM (the same as
tests/test_kernels_dequant.py::test_q4linear_cuda_prefill_in_row_blocks)."""
import torch

import olmo_local.quant.linear as ql
from olmo_local.quant.formats import quantize_q4

g = torch.Generator(device="cuda").manual_seed(0)
w = torch.randn(22016, 3840, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
d = quantize_q4(w, 128, search=False)
lin = ql.Q4Linear(d["qweight"], d["scales"], d["mins"], 128)
x = torch.randn(512, 3840, device="cuda", generator=g, dtype=torch.bfloat16)
with torch.inference_mode():
    blocks = lin(x)  # 22016 x 3840 > 32 Mi elements: row blocks
    old = ql.PREFILL_SCRATCH_ELEMS
    ql.PREFILL_SCRATCH_ELEMS = 1 << 40
    whole = lin(x)
    ql.PREFILL_SCRATCH_ELEMS = old
rel = ((blocks.float() - whole.float()).norm() / whole.float().norm()).item()
ok = rel < 1e-3 and blocks.shape == whole.shape
print(f"[{'PASS' if ok else 'FAIL'}] q4 prefill in row blocks vs one block: relative difference {rel:.2e}")
raise SystemExit(0 if ok else 1)
