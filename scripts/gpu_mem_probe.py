#!/usr/bin/env python
"""Peak device memory of filling a 7B q4 state to depth 32768 (int8 KV, 33,000-position cache), per
prefill chunk size (the host overhead per token is scripts/gpu_host_gap.py's).

    python scripts/gpu_mem_probe.py [--chunks 2048 1024 512] [--depth 32768]
"""

from __future__ import annotations

import argparse
import time

import torch

from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.generate import Generator
from olmo_local.state import DecodeState

GiB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 1024, 512])
    ap.add_argument("--depth", type=int, default=32768)
    a = ap.parse_args()
    m = build_synthetic(preset("7b"), "cuda", "q4", seed=0)
    torch.cuda.synchronize()
    w = torch.cuda.memory_allocated()
    st = DecodeState(m.config, a.depth + 232, "cuda", torch.bfloat16, kv_cache="int8")
    base = torch.cuda.memory_allocated()
    print(f"weights {w / GiB:.3f} GiB · state {(base - w) / GiB:.3f} GiB · total before prefill {base / GiB:.3f} GiB")
    ids = torch.randint(0, m.config.vocab_size, (a.depth,), generator=torch.Generator().manual_seed(0)).tolist()
    for chunk in a.chunks:
        st.reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gen = Generator(m, st, prefill_chunk=chunk)
        t0 = time.perf_counter()
        gen.prefill(ids)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        print(f"chunk {chunk:>5}: fill {a.depth} tokens in {dt:.2f} s ({a.depth / dt:.0f} tok/s) · peak {peak / GiB:.3f} GiB"
              f" (+{(peak - base) / GiB:.3f} over weights + state)")


if __name__ == "__main__":
    main()
