#!/usr/bin/env python
"""Where the host's time between two greedy decode steps goes (7B synthetic q4, CUDA graphs).

Per token, 64 tokens each: replays queued back to back (no host wait: the GPU-only time), replay +
stream sync, replay + event sync, replay + sync + reading the pinned id, DecodeStep.greedy(), and
Generator.greedy_step(); the differences are the host gap per token.

    python scripts/gpu_host_gap.py [--preset 7b]
"""

from __future__ import annotations

import argparse
import time

import torch

from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.decode import DecodeStep
from olmo_local.generate import Generator
from olmo_local.state import DecodeState


def per_token(fn, n: int = 64) -> float:
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    a = ap.parse_args()
    m = build_synthetic(preset(a.preset), "cuda", "q4", seed=0)
    st = DecodeState(m.config, 4096, "cuda", torch.bfloat16)
    gen = Generator(m, st)
    step = DecodeStep(m, st)
    gen.step_fn = step
    gen.prefill(list(range(16)))
    tok = step.greedy(1)
    g = step.pick_graphs["greedy"][1][0][0]
    s = torch.cuda.current_stream()
    ev = torch.cuda.Event()

    def rewind():
        st.pos = 100
        st.pos_t.fill_(100)
        st.tokens = st.tokens[:100]

    rows = []
    rows.append(("replays queued back to back", per_token(lambda: g.replay())))
    rewind()
    rows.append(("replay + stream sync", per_token(lambda: (g.replay(), s.synchronize()))))
    rewind()
    rows.append(("replay + event sync", per_token(lambda: (g.replay(), ev.record(), ev.synchronize()))))
    rewind()
    rows.append(("replay + sync + read pinned id", per_token(lambda: (g.replay(), s.synchronize(), int(step.host_ids[0][0])))))
    rewind()
    state = {"t": tok}

    def greedy():
        state["t"] = step.greedy(state["t"])
    rows.append(("DecodeStep.greedy", per_token(greedy)))
    rewind()

    def gen_greedy():
        state["t"] = gen.greedy_step(state["t"])
    rows.append(("Generator.greedy_step", per_token(gen_greedy)))
    rewind()
    rows.append(("plain graph step + argmax (.item)", per_token(lambda: int(step(5).argmax()))))
    rewind()
    from olmo_local.generate import Sampler, SamplingParams

    for name, sp in (("T=0.7 (the generate default)", SamplingParams(temperature=0.7)),
                     ("T=0.6 top-p 0.95", SamplingParams(temperature=0.6, top_p=0.95)),
                     ("T=0.7 top-k 40 min-p 0.05", SamplingParams(temperature=0.7, top_k=40, min_p=0.05))):
        sampler = Sampler(sp, m.config.vocab_size, "cuda")
        rows.append((f"graph step + Sampler {name}", per_token(lambda sampler=sampler: sampler(step(5), []))))
        rewind()
        step.seed_sampler(0)
        rows.append((f"sampling graph (DecodeStep.sample) {name}", per_token(lambda sp=sp: step.sample(5, sp))))
        rewind()
    base = rows[0][1]
    for name, us in rows:
        print(f"{name:<52}{us:>9.1f} us/token  (+{us - base:.1f})")


if __name__ == "__main__":
    main()
