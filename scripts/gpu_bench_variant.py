#!/usr/bin/env python
"""`olmo-local bench` with one q4 decode-GEMV variant switched in, for same-card A/B runs.

    python scripts/gpu_bench_variant.py VARIANT [bench arguments...]

VARIANT: std (q4 linears in the standard layout, hand prefetch), tiled (tiled layout, hand prefetch),
tiledstN (tiled layout, Triton-pipelined loop with N stages), stdstN (standard layout, N stages),
default (whatever the package defaults are).
"""

from __future__ import annotations

import re
import sys

import olmo_local.kernels.gemv_q4 as k4
import olmo_local.quant.linear as ql


def main() -> int:
    variant, args = sys.argv[1], sys.argv[2:]
    m = re.fullmatch(r"(std|tiled|default)(?:st(\d))?", variant)
    if not m:
        print(f"unknown variant {variant!r}", file=sys.stderr)
        return 2
    layout, stages = m.group(1), m.group(2)
    if layout == "std":
        ql.Q4Linear.tile_ = lambda self: False  # keep the standard layout on the GPU
    if stages:
        k4.DEFAULT_PREFETCH = False
        k4.DEFAULT_STAGES = int(stages)
    elif layout != "default":
        k4.DEFAULT_PREFETCH = True
    from olmo_local.cli import main as cli_main

    sys.argv = ["olmo-local", "bench", *args]
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
