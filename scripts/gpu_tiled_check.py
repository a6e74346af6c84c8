#!/usr/bin/env python
"""Does the GPU decode path give the same logits whatever the q4 layout and the fused launches?

A synthetic q4 model (preset given as argv[1], default 1b) is built on CUDA from one seed, with its q4
linears in the standard layout or tiled (as load_model does). The reference run (standard layout, no
no fused attention prep) prefills 64 tokens and decodes 24 greedy tokens through the CUDA
graph; every other variant is fed the same tokens (teacher forcing) and its logits are compared, for
bf16 and int8 KV. Tiled vs standard must be identical; the fused launches sum in another order
(within 1 % of the largest logit).

    python scripts/gpu_tiled_check.py [7b|1b]
"""

import sys

import torch

import olmo_local.quant.linear as ql
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.decode import DecodeStep
from olmo_local.state import DecodeState


def run(tiled: bool, fused: bool, kv: str, name: str, feed: list[int] | None):
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
        toks = [int(out[0].argmax())] if feed is None else list(feed)
        for i in range(24):
            lg = step(toks[i]).float()
            out.append(lg.clone())
            if feed is None:
                toks.append(int(lg.argmax()))
    del m, step, st
    torch.cuda.empty_cache()
    return torch.stack(out), toks, n_tiled


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "1b"
    bad = 0
    for kv in ("bf16", "int8"):
        ref, ref_toks, _ = run(False, False, kv, name, None)
        for tiled, fused in ((True, False), (True, True), (False, True)):
            lg, _, n = run(tiled, fused, kv, name, ref_toks)
            diff = (lg - ref).abs().max().item()
            scale = ref.abs().max().item()
            same_top = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
            ok = diff == 0.0 if not fused else diff <= 1e-2 * scale
            bad += not ok
            print(f"{'PASS' if ok else 'FAIL'} kv={kv} tiled={tiled} ({n} layers) fused prep={fused}: "
                  f"max |dlogit| {diff:.3e} (max |logit| {scale:.2f}), same argmax {100 * same_top:.0f} %")
    DecodeStep.fuse_attention_prep = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
