#!/usr/bin/env python
"""Which path leaves a different decode state on the GPU? The tiny preset's random checkpoint (as in
tests/test_chat.py::test_snapshots_on_cuda), fp32: prefill N tokens on CPU (reference) vs on CUDA, and
CUDA prefill of N-k tokens + k decode steps (eager forward, static step without graph, CUDA graph).
Prints the max |difference| of the conv state, recurrent state and KV cache against the CPU prefill."""

import sys
import tempfile

import torch

from olmo_local.checkpoint import load_model
from olmo_local.config import preset
from olmo_local.decode import DecodeStep
from olmo_local.random_init import write_random_checkpoint
from olmo_local.state import DecodeState

name = sys.argv[1] if len(sys.argv) > 1 else "tiny"
d = tempfile.mkdtemp() + "/m"
cfg = preset(name)
write_random_checkpoint(d, cfg, seed=5)
ids = torch.randint(0, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
N, K = ids.shape[1], 6


def states(dev, split, mode):
    m = load_model(d, dev, torch.float32)
    st = DecodeState(m.config, 128, dev, torch.float32)
    with torch.inference_mode():
        m(ids[:, :split].to(dev), st)
        if split < N:
            step = DecodeStep(m, st, use_graph=(mode == "graph")) if mode != "eager" else None
            for t in ids[0, split:].tolist():
                if step is None:
                    m(torch.tensor([[t]], device=dev), st)
                else:
                    step(t)
    return st


ref = states("cpu", N, "prefill")
rows = [("cuda prefill", states("cuda", N, "prefill"))]
for mode in ("eager", "static", "graph"):
    rows.append((f"cuda prefill {N - K} + {K} {mode} steps", states("cuda", N - K, mode)))
rows.append((f"cpu prefill {N - K} + {K} eager steps", states("cpu", N - K, "eager")))
bad = 0
for label, st in rows:
    diffs = []
    for nm in ("conv_state", "rec_state"):
        diffs.append((nm, (getattr(st, nm).float().cpu() - getattr(ref, nm).float()).abs().max().item()))
    diffs.append(("k_cache", (st.k_cache[:, :, :N].float().cpu() - ref.k_cache[:, :, :N].float()).abs().max().item()))
    worst = max(v for _, v in diffs)
    bad += worst > 1e-3
    print(f"{label:<40} " + "  ".join(f"{n} {v:.2e}" for n, v in diffs) + ("   <-- differs" if worst > 1e-3 else ""))
raise SystemExit(1 if bad else 0)
