#!/usr/bin/env python
"""The q4 tensor-core GEMV through TMA descriptors (gemv_q4.TMA_STAGES) against the hand-prefetched loop, at the
7B shapes on one GPU: every projection (plain, gate|up with a folded norm's rstd, a folded norm's producer), each
with 2-6 stages. Prints the largest relative difference per case; the two loops add the same products in the same
order, so they should agree to the last bit."""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # CPU: small shapes through the Triton interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch

import olmo_local.kernels.gemv_q4 as k4


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    torch.manual_seed(0)
    dry = "--dry-run" in sys.argv
    dev = torch.device("cpu" if dry else "cuda")
    shapes = [("in", 384, 512, False), ("gate|up", 256, 384, True)] if dry else [("gdn_in", 17280, 3840, False), ("gdn_o", 3840, 5760, False), ("gate|up", 11008, 3840, True),
              ("down", 3840, 11008, False), ("qkv", 11520, 3840, False)]
    worst = 0.0
    for name, n, k, gated in shapes:
        rows = 2 * n if gated else n
        q = torch.randint(0, 16, (rows, k), dtype=torch.uint8, device=dev)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        ng = k // 128
        scales = (torch.rand(rows, ng, device=dev) * 0.02).half()
        mins = (-torch.rand(rows, ng, device=dev) * 0.1).half()
        qt, st, mt = k4.q4_tile(packed, scales, mins, 128)
        x = torch.randn(1, k, device=dev).bfloat16()
        ss = torch.rand(5, device=dev) * k
        res = torch.randn(n, device=dev).bfloat16()
        fw = torch.rand(n, device=dev).bfloat16()
        cases = [("plain", {})]
        if gated:
            cases.append(("rstd", {"rstd": (ss, 1e-6)}))
        else:
            cases.append(("fold", {"fold": (res, fw)}))
        for case, kw in cases:
            outs = {}
            for stages in ((0, 3) if dry else (0, 3, 5)):
                k4.TMA_STAGES = stages
                y = k4._q4_launch(x, qt, st, mt, 128, None, gated, tiled=True, **kw)
                torch.cuda.synchronize() if not dry else None
                outs[stages] = y[0] if isinstance(y, tuple) else y
            k4.TMA_STAGES = 0
            diffs = {s: rel(outs[s], outs[0]) for s in outs if s}
            worst = max(worst, *diffs.values())
            print(f"{name:8s} {case:6s} " + "  ".join(f"tma{s}: {d:.2e}" for s, d in diffs.items()))
    print(f"TMA check: worst relative difference {worst:.2e} -> {'PASS' if worst < 1e-3 else 'FAIL'}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
