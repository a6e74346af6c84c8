#!/usr/bin/env python
"""Upper bound of what fusing the decode step's RMSNorms into neighbouring kernels could save: the
graph-replayed 7B q4 step timed as is, and with the norm launches replaced by plain views (wrong math,
timing only). Prints both step times.

    python scripts/gpu_norm_bound.py
"""

from __future__ import annotations

import torch

import olmo_local.decode as dec
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.state import DecodeState


def step_us(m) -> float:
    st = DecodeState(m.config, 1024, "cuda", torch.bfloat16)
    step = dec.DecodeStep(m, st)
    tok = step.greedy(1)
    for _ in range(5):
        tok = step.greedy(tok)
    g = step.pick_graphs["greedy"][1][0][0]
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        st.pos, st.tokens = 8, st.tokens[:8]
        st.pos_t.fill_(8)
        a.record()
        for _ in range(40):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / 40)
    return sorted(ts)[2]


def main() -> None:
    m = build_synthetic(preset("7b"), "cuda", "q4", seed=0)
    base = step_us(m)
    real = (dec.add_rmsnorm, dec.rmsnorm_add, dec.rmsnorm, dec.residual_add)
    dec.add_rmsnorm = lambda x, r, w, eps: (x, r)
    dec.rmsnorm_add = lambda x, r, w, eps: r
    dec.residual_add = lambda x, r: r
    no_norm = step_us(m)
    dec.add_rmsnorm, dec.rmsnorm_add, dec.rmsnorm, dec.residual_add = real
    again = step_us(m)
    print(f"step with norms {base:.1f} us · without the 72 norm/add launches {no_norm:.1f} us "
          f"(bound on fusing them: {base - no_norm:.1f} us = {100 * (base - no_norm) / base:.1f} %) · again {again:.1f} us")


if __name__ == "__main__":
    main()
