#!/usr/bin/env python
"""Where prefill time goes: torch.profiler over one prompt through the 7B synthetic model.

    python scripts/gpu_profile_prefill.py [--format q4] [--tokens 512 2048] [--preset 7b] [--no-check]

Prints, per prompt length, wall time and tokens/s of a state-ful prefill (as bench's pp row), then
the top ops by device time (self), so prefill work can go where the time is. First, for the first
length, the last-token logits and the recurrent state are compared with the same prefill through the
torch reference ops (`backend("torch")`), so a wrong kernel shows up next to its timing. CPU works
too (--device cpu --preset tiny) for a smoke run.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="7b")
    p.add_argument("--format", default="q4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the torch reference ops")
    a = p.parse_args()

    from olmo_local.bench_synth import build_synthetic
    from olmo_local.config import preset
    from olmo_local.kernels import backend
    from olmo_local.state import DecodeState

    dev = torch.device(a.device)
    cfg = preset(a.preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_synthetic(cfg, dev, a.format, dtype=dtype)
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i, n in enumerate(a.tokens):
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(dev)
        state = DecodeState(cfg, max(n + 16, 64), dev, dtype)
        with torch.no_grad():
            if i == 0 and not a.no_check:
                got = model(ids, state, last_only=True).float()
                rec = state.rec_state.clone()
                state.reset()
                with backend("torch"):
                    want = model(ids, state, last_only=True).float()
                d = (got - want).abs().max().item()
                ds = ((state.rec_state - rec).norm() / state.rec_state.norm()).item()
                print(f"check vs torch ops ({n} tokens): max |dlogit| {d:.3g} (logits up to "
                      f"{want.abs().max().item():.3g}), same argmax {bool(got.argmax() == want.argmax())}, "
                      f"recurrent state rel. err {ds:.3g}")
            for _ in range(2):  # warm-up (allocator, cuBLAS heuristics, Triton compiles)
                state.reset()
                model(ids, state, last_only=True)
            sync()
            times = []
            for _ in range(3):
                state.reset()
                sync()
                t0 = time.perf_counter()
                model(ids, state, last_only=True)
                sync()
                times.append(time.perf_counter() - t0)
            t = min(times)
            print(f"prefill {n:5d} tokens: {t * 1e3:8.1f} ms  {n / t:9.0f} tok/s")
            acts = [torch.profiler.ProfilerActivity.CPU]
            if dev.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            state.reset()
            with torch.profiler.profile(activities=acts) as prof:
                model(ids, state, last_only=True)
                sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
