#!/usr/bin/env python
"""A short chat turn deep in a long conversation (the synthetic 7B q4 runtime as bench builds it): the time
to prefill a TURN-token turn after DEPTH tokens through the prefill graphs (attention over the cache by
kernels/attention_cached.py: one program per head and 64 query rows, no split over keys) against the eager
prefill (SDPA over the cache, or the int8 block path), in one process; and their logits' difference.

    python scripts/gpu_turn_depth.py [--kv-cache bf16|int8] [--depths 4096 16384 32000] [--turn 40]
"""

from __future__ import annotations

import argparse
import time

import torch

from olmo_local.bench_run import random_ids
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.runtime import make_generator
from olmo_local.state import DecodeState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-cache", default="bf16")
    ap.add_argument("--depths", type=int, nargs="*", default=[4096, 16384, 32000])
    ap.add_argument("--turn", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (the padded forward, eagerly)")
    a = ap.parse_args()
    cfg = preset(a.preset, max_position_embeddings=65536)
    net = build_synthetic(cfg, a.device, "q4", torch.bfloat16, seed=0)
    st = DecodeState(cfg, max(a.depths) + 520, a.device, net.dtype, kv_cache=a.kv_cache)
    gen = make_generator(net, st)
    if gen.prefill_graphs is None:
        from olmo_local.prefill_graph import PrefillGraphs
        gen.prefill_graphs = PrefillGraphs(net, st, use_graph=False)
    pg = gen.prefill_graphs
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    turn = random_ids(a.turn, cfg.vocab_size, 4)
    history = random_ids(max(a.depths), cfg.vocab_size, 3)
    with torch.inference_mode():
        for depth in a.depths:
            st.reset()
            gen.prefill_graphs = None
            gen.prefill(history[:depth])
            snap = st.snapshot()
            out = {}
            for label, graphs in (("eager", None), ("graph", pg)):
                gen.prefill_graphs = graphs
                ts, r0 = [], pg.replays
                for _ in range(a.reps + 1):  # the first run of the graph bucket captures
                    st.restore(snap)
                    sync()
                    t0 = time.perf_counter()
                    lg = gen.prefill(turn)
                    sync()
                    ts.append((time.perf_counter() - t0) * 1e3)
                out[label] = lg.float()
                if graphs is not None:
                    assert pg.replays - r0 == a.reps + 1, "the turn did not take the prefill graphs"
                ts = sorted(ts[1:])
                print(f"{a.kv_cache} KV, turn of {a.turn} after {depth:6d}: {label:5s} median {ts[len(ts) // 2]:7.2f} ms "
                      f"(min {ts[0]:.2f}, max {ts[-1]:.2f})")
            d = (out["graph"] - out["eager"]).abs().max().item()
            print(f"{a.kv_cache} KV, after {depth:6d}: max |logit graph - eager| {d:.4f} "
                  f"(of {out['eager'].abs().max().item():.2f})")
    st.restore(snap)


if __name__ == "__main__":
    main()
