#!/usr/bin/env python
"""Does the GPU decode path give the same logits whatever the q4 layout and the attention prep?

A synthetic q4 model (preset given as argv[1], default 1b) is built twice on CUDA from one seed: once
with its q4 linears left in the standard layout, once tiled (as load_model does). Each runs a 64-token
prefill and 24 graph-captured decode steps (bf16 and int8 KV; NoPE attention through attention_prep
and, for the tiled model, also through the unfused ops). Prints the max |difference| of the logits
against the standard-layout, unfused run and whether the greedy tokens agree.

    python scripts/gpu_tiled_check.py [7b|1b]
"""

import sys

import torch

import olmo_local.quant.linear as ql
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.decode import DecodeStep
from olmo_local.state import DecodeState


def run(tiled: bool, fused: bool, kv: str, name: str):
    orig = ql.Q4Linear.tile_
    if not tiled:
        ql.Q4Linear.tile_ = lambda self: False
    try:
        m = build_synthetic(preset(name), "cuda", "q4", seed=3)
    finally:
        ql.Q4Linear.tile_ = orig
    n_tiled = sum(1 for x in m.modules() if isinstance(x, ql.Q4Linear) and x.tiled)
    DecodeStep.fuse_attention_prep = fused
    st = DecodeState(m.config, 256, "cuda", torch.bfloat16, kv_cache=kv)
    ids = torch.randint(0, m.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = [m(ids.cuda(), st)[0, -1].float()]
        step = DecodeStep(m, st)
        tok = int(out[0].argmax())
        toks = [tok]
        for _ in range(24):
            lg = step(tok).float()
            out.append(lg.clone())
            tok = int(lg.argmax())
            toks.append(tok)
    del m, step, st
    torch.cuda.empty_cache()
    return torch.stack(out), toks, n_tiled


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "1b"
    bad = 0
    for kv in ("bf16", "int8"):
        ref, ref_toks, _ = run(False, False, kv, name)
        for tiled, fused in ((True, True), (True, False), (False, True)):
            lg, toks, n = run(tiled, fused, kv, name)
            diff = (lg - ref).abs().max().item()
            scale = ref.abs().max().item()
            same = toks == ref_toks
            ok = diff <= 1e-2 * scale and same
            bad += not ok
            print(f"{'PASS' if ok else 'FAIL'} kv={kv} tiled={tiled} ({n} layers) fused_prep={fused}: "
                  f"max |dlogit| {diff:.3e} (max |logit| {scale:.2f}), greedy tokens {'equal' if same else 'DIFFER'}")
    DecodeStep.fuse_attention_prep = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
