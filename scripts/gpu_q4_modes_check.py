#!/usr/bin/env python
"""The q4 tensor-core GEMV's loop variants (gemv_q4.LEAN_ACC, RING_SETS, STATIC_GROUPS) against the default loop,
at the 7B shapes on one GPU (or, with --dry-run, small shapes in the Triton interpreter): every projection,
plain, gate|up with a folded norm's rstd, and a folded norm's producer. The variants add the same products; only
the order of the fp32 sums may differ (bf16 outputs: a rounding flip here and there)."""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

import olmo_local.kernels.gemv_q4 as k4

MODES = {"lean": dict(LEAN_ACC=True), "static": dict(STATIC_GROUPS=16), "lean+static": dict(LEAN_ACC=True, STATIC_GROUPS=16),
         "lean+ring2": dict(LEAN_ACC=True, RING_SETS=2)}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    torch.manual_seed(0)
    dry = "--dry-run" in sys.argv
    dev = torch.device("cpu" if dry else "cuda")
    shapes = [("in", 384, 640, False), ("gate|up", 256, 384, True)] if dry else [
        ("gdn_in", 17280, 3840, False), ("gdn_o", 3840, 5760, False), ("gate|up", 11008, 3840, True),
        ("down", 3840, 11008, False), ("qkv", 11520, 3840, False), ("attn_o", 3840, 3840, False)]
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
        cases = [("plain", {}), ("rstd", {"rstd": (ss, 1e-6)}) if gated else ("fold", {"fold": (res, fw)})]
        for case, kw in cases:
            base = k4._q4_launch(x, qt, st, mt, 128, None, gated, tiled=True, **kw)
            base = base[0] if isinstance(base, tuple) else base
            diffs = {}
            for mode, knobs in MODES.items():
                old = {a: getattr(k4, a) for a in knobs}
                for a, v in knobs.items():
                    setattr(k4, a, v)
                try:
                    y = k4._q4_launch(x, qt, st, mt, 128, None, gated, tiled=True, **kw)
                finally:
                    for a, v in old.items():
                        setattr(k4, a, v)
                diffs[mode] = rel(y[0] if isinstance(y, tuple) else y, base)
            worst = max(worst, *diffs.values())
            print(f"{name:8s} {case:6s} " + "  ".join(f"{m}: {d:.1e}" for m, d in diffs.items()))
    ok = worst < 1e-3
    print(f"q4 loop modes: worst relative difference {worst:.1e} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
