#!/usr/bin/env python
"""What each kind of non-GEMV launch costs the 7B q4 decode step on the critical path (timing only:
the ablated steps compute wrong values). Each variant captures its own graph of the step with some ops
replaced by nothing (their output is an input of the right shape), then times back-to-back replays:

    base      the step as it ships
    nonorm    the residual adds / RMSNorms launched between projections skipped (those folded into the
              q4 GEMVs stay)
    nogdn     the fused GDN step skipped (24 launches)
    noattn    attention prep + decode skipped (8 + 8 launches)
    gemv      all three skipped: the chain of q4 GEMVs, the embedding and the q8 head
    noprep    attention_prep skipped (attention decode still runs)
    abloop    the GDN step's a|b projection as its loop over 512-wide chunks after the wait (the form
              before W_ab rows were loaded whole before it)
    pick      the step as the greedy graphs run it (argmax, token feedback, id to host), not an ablation:
              pick minus base is what the pick tail costs

    python scripts/gpu_ablate_decode.py [--preset 7b] [--reps 200] [--variants base,pick,...]
"""

from __future__ import annotations

import argparse

import torch

import olmo_local.decode as dec
import olmo_local.kernels.gdn_decode as kg
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.state import DecodeState

_ORIG = {k: getattr(dec, k) for k in ("residual_norm", "rmsnorm", "rmsnorm_add_rmsnorm", "gdn_decode_step",
                                      "attention_prep", "attention_decode")}

_AB_ONCE = kg.AB_ONCE_MAX_D
_HV = [1]  # value heads of the model being timed (nogdn's stand-in sums)


def _skip_norm(mode, y, x, w=None, eps=0.0):
    return (y, x) if mode == "add_rmsnorm" else y


def _patch(variant: str) -> None:
    for k, v in _ORIG.items():
        setattr(dec, k, v)
    kg.AB_ONCE_MAX_D = 0 if variant == "abloop" else _AB_ONCE
    if variant in ("nonorm", "gemv"):
        dec.residual_norm = _skip_norm
        dec.rmsnorm = lambda x, w, eps: x
        dec.rmsnorm_add_rmsnorm = lambda y, x, w, eps, w2, eps2: (y, x)
    if variant in ("nogdn", "gemv"):
        def _no_gdn(qkv, z, *a, folded=False, **k):  # folded steps also give the heads' sums of squares
            hs = torch.full((_HV[0], 1), 192.0, device=z.device)
            return (z, hs) if folded else z

        dec.gdn_decode_step = _no_gdn
    if variant in ("noattn", "gemv"):
        dec.attention_decode = lambda q, *a, **k: q


def time_step(m, variant: str, reps: int) -> float:
    _patch(variant)
    st = DecodeState(m.config, 512, "cuda", torch.bfloat16)
    step = dec.DecodeStep(m, st)
    H, hd = m.config.num_attention_heads, m.config.head_dim
    if variant == "noprep":
        dec.attention_prep = lambda qkv, *a, **k: qkv.view(-1)[: H * hd].view(H, hd)
    if variant in ("noattn", "gemv"):  # attention's output has H * hd values
        dec.attention_prep = lambda qkv, *a, **k: qkv.view(-1)[: H * hd]
    with torch.inference_mode():
        step(1)
        gs = [step.graphs[0][0]]
        if variant == "pick":  # the two greedy pick graphs (argmax, token feedback, id to host), alternating
            step.capture(("greedy", None))
            gs = step.pick_graphs["greedy"][1][0]
        for i in range(10):
            gs[i % len(gs)].replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(reps):
            gs[i % len(gs)].replay()
        e1.record()
        torch.cuda.synchronize()
    del step, st
    return e0.elapsed_time(e1) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--variants", default="base,pick,noprep,nonorm,nogdn,noattn,gemv,base,pick")
    a = ap.parse_args()
    m = build_synthetic(preset(a.preset), "cuda", "q4", seed=0)
    _HV[0] = m.config.linear_num_value_heads
    res = {}
    for v in a.variants.split(","):
        res.setdefault(v, []).append(time_step(m, v, a.reps))
        print(f"# {v} {res[v][-1]:.1f} us", flush=True)
    _patch("base")
    b = min(res["base"])
    print(f"{'variant':<8}{'us/step':>10}{'saved us':>10}")
    for v, ts in res.items():
        t = min(ts)
        print(f"{v:<8}{t:>10.1f}{b - t:>10.1f}   {' '.join(f'{x:.1f}' for x in ts)}")


if __name__ == "__main__":
    main()
