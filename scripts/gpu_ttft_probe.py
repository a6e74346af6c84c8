#!/usr/bin/env python
"""Where bench's ttft goes: the synthetic 7B q4 runtime as `olmo-local bench` builds it; prints prefill
times (pp512's measurement) and first_token_s samples (ttft's), fresh and after a pipelined tg128, and
the split of one ttft into prefill, sync and the first pick.

    python scripts/gpu_ttft_probe.py [--ctx 33000]
"""

from __future__ import annotations

import argparse
import time

import torch

from olmo_local import generate as G
from olmo_local.bench_run import OursEngine, _timed, random_ids
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.runtime import Runtime, make_generator
from olmo_local.state import DecodeState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=33000)
    a = ap.parse_args()
    cfg = preset("7b", max_position_embeddings=max(65536, a.ctx))
    net = build_synthetic(cfg, "cuda", "q4", torch.bfloat16, seed=0)
    st = DecodeState(cfg, a.ctx, "cuda", net.dtype)
    gen = make_generator(net, st)
    eng = OursEngine(Runtime(None, cfg, net, None, st, gen, torch.device("cuda"), 0.0))
    prompt = random_ids(512, cfg.vocab_size, 0)
    parts: dict[str, float] = {}
    real_prefill, real_sync = G.Generator.prefill, G.Generator._sync

    def timed_prefill(self, ids, progress=None):
        t = time.perf_counter()
        out = real_prefill(self, ids, progress)
        parts["prefill (host)"] = (time.perf_counter() - t) * 1e3
        return out

    def timed_sync(self):
        t = time.perf_counter()
        real_sync(self)
        parts["sync"] = (time.perf_counter() - t) * 1e3

    def row(label: str) -> None:
        pp = [_timed(eng, lambda: (eng.reset(), eng.prefill(prompt))) * 1e3 for _ in range(4)]
        tt = [eng.first_token_s(prompt) * 1e3 for _ in range(4)]
        print(f"{label:<28} prefill ms {' '.join(f'{x:6.1f}' for x in pp)} | ttft ms {' '.join(f'{x:6.1f}' for x in tt)}")

    with torch.inference_mode():
        row("fresh")
        row("again")
        eng.reset()
        for _ in eng.greedy_picks(1, 128):
            pass
        torch.cuda.synchronize()
        row("after a pipelined tg128")
        G.Generator.prefill, G.Generator._sync = timed_prefill, timed_sync
        for _ in range(3):
            t = eng.first_token_s(prompt) * 1e3
            print(f"one ttft {t:6.1f} ms: " + ", ".join(f"{k} {v:6.1f}" for k, v in parts.items()))
        G.Generator.prefill, G.Generator._sync = real_prefill, real_sync
        torch.cuda.synchronize()
        print(f"allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
              f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
