#!/usr/bin/env python
"""Where a decode step's time goes: CUPTI kernel records (torch.profiler) of CUDA-graph replays of the
7B synthetic q4 step. Prints, per kernel name, launches per step, mean and total microseconds per step,
the busy time (sum of kernel durations) against the step's wall time, and the gaps between kernels.

    python scripts/gpu_profile_decode.py [--preset 7b] [--kv-cache bf16|int8] [--depth N] [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.decode import DecodeStep
from olmo_local.state import DecodeState


def short(name: str) -> str:
    for key in ("_q4_gemv_kernel", "_q8_gemv_kernel", "_gdn_decode_kernel", "_attn_decode_kernel",
                "_attn_prep_kernel", "_rmsnorm_kernel", "_quantize_kv_kernel"):
        if key in name:
            return key
    return name[:60]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--kv-cache", default="bf16")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    m = build_synthetic(preset(a.preset), "cuda", "q4", seed=0)
    st = DecodeState(m.config, a.depth + 256, "cuda", torch.bfloat16, kv_cache=a.kv_cache)
    if a.depth:
        st.pos = a.depth
        st.pos_t.fill_(a.depth)
    step = DecodeStep(m, st)
    with torch.inference_mode():
        for _ in range(5):
            step(1)
        torch.cuda.synchronize()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        for _ in range(a.steps):
            step.graphs[0][0].replay()
        ev1.record()
        torch.cuda.synchronize()
        wall = ev0.elapsed_time(ev1) * 1e3 / a.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step.graphs[0][0].replay()
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    per = collections.defaultdict(list)
    marg = collections.defaultdict(list)  # end minus the previous kernel's end: what the kernel adds
    for i, e in enumerate(evs):
        per[short(e.name)].append(e.time_range.end - e.time_range.start)
        if i:
            marg[short(e.name)].append(e.time_range.end - evs[i - 1].time_range.end)
    busy = sum(e.time_range.end - e.time_range.start for e in evs) / a.steps
    span = (evs[-1].time_range.end - evs[0].time_range.start) / a.steps if evs else 0.0
    gaps = [b.time_range.start - a_.time_range.end for a_, b in zip(evs, evs[1:])]
    neg = sum(1 for g in gaps if g < 0)
    print(f"step wall {wall:.1f} us (graph replay, events) · profiled span {span:.1f} us · kernel busy {busy:.1f} us"
          f" · {len(evs) / a.steps:.0f} kernels/step · overlapping starts {neg / a.steps:.0f}/step (PDL)")
    print(f"{'kernel':<40}{'n/step':>7}{'mean us':>9}{'us/step':>9}{'marg us':>9}{'marg/step':>10}")
    rows = sorted(per.items(), key=lambda kv: -sum(kv[1]))
    for name, ds in rows:
        mg = marg.get(name, [0.0])
        print(f"{name[:40]:<40}{len(ds) / a.steps:>7.0f}{sum(ds) / len(ds):>9.2f}{sum(ds) / a.steps:>9.1f}"
              f"{sum(mg) / len(mg):>9.2f}{sum(mg) / a.steps:>10.1f}")
    # per position in the step (the first two layers and the tail), averaged over the steps
    k = len(evs) // a.steps
    if k * a.steps == len(evs):
        pos = list(range(min(26, k))) + list(range(max(26, k - 6), k))  # the first attention layer is 16-23 in the 7B
        cells = []
        for i in pos:
            m_ = [evs[j * k + i].time_range.end - evs[j * k + i - 1].time_range.end for j in range(a.steps)
                  if j * k + i > 0]
            d_ = [evs[j * k + i].time_range.end - evs[j * k + i].time_range.start for j in range(a.steps)]
            cells.append(f"{i}:{short(evs[i].name).strip('_')[:10]} {sum(d_) / len(d_):.1f}/{sum(m_) / max(1, len(m_)):.1f}")
        print("by position (duration/marginal us):", " | ".join(cells))
    if a.json:
        out = {"wall_us": wall, "busy_us": busy, "span_us": span,
               "kernels": {k: [len(v) / a.steps, sum(v) / a.steps] for k, v in rows}}
        if k * a.steps == len(evs):  # every position: (kernel, mean duration, mean marginal) in us
            out["positions"] = [
                [short(evs[i].name), sum(evs[j * k + i].time_range.end - evs[j * k + i].time_range.start
                                         for j in range(a.steps)) / a.steps,
                 sum(evs[j * k + i].time_range.end - evs[j * k + i - 1].time_range.end
                     for j in range(a.steps) if j * k + i > 0) / max(1, a.steps - (i == 0))]
                for i in range(k)]
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
