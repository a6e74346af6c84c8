#!/usr/bin/env python
"""What attention decode costs after the 7B qkv projection: 20 pairs (q4 qkv GEMV, attention decode)
chained in a CUDA graph (PDL on, as in the decode step) minus 20 GEMVs alone, per context size,
length, split count and warps, with the length read after the wait (late) or the position before it
(early, the decode step's default).

    python scripts/gpu_attn_probe.py
"""

from __future__ import annotations

import importlib

import torch

from olmo_local.kernels import gemv_q4 as k4

from gpu_floor_probe import random_q4_tiled, timed

ka = importlib.import_module("olmo_local.kernels.attention_decode")
H = KV = 30
HD, D, N = 128, 3840, 20


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    n = (H + 2 * KV) * HD
    qw, s, m = random_q4_tiled(n, D, gen)
    x = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
    qkv = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    q = torch.randn(H, HD, device=dev, generator=gen).to(torch.bfloat16)
    out = torch.empty(H, HD, device=dev, dtype=torch.bfloat16)
    length = torch.zeros(1, dtype=torch.int32, device=dev)
    pos = torch.zeros(1, dtype=torch.int32, device=dev)

    def gemv():
        k4.q4_gemv_triton(x, qw, s, m, 128, qkv, tiled=True)

    base = timed(gemv, N) / N
    print(f"{torch.cuda.get_device_name()}: qkv GEMV alone {base:.2f} us")
    for ctx, lengths in ((4096, (128, 640, 4000)), (33000, (640, 32768))):
        kc = torch.randn(KV, ctx, HD, device=dev, generator=gen).to(torch.bfloat16)
        vc = torch.randn(KV, ctx, HD, device=dev, generator=gen).to(torch.bfloat16)
        ns0 = ka.default_num_splits(ctx, H, dev)
        for L in lengths:
            length.fill_(L)
            pos.fill_(L - 1)
            row = []
            for early in (False, True):
                for w in (8, 4):
                    us = timed(lambda: (gemv(), ka.attention_decode_triton(
                        q, kc, vc, length, out, num_warps=w, pos=pos if early else None)), N) / N - base
                    row.append(f"{'early' if early else 'late'} w{w} {us:.2f}")
            print(f"ctx {ctx} ({ns0} splits) L={L}: " + " · ".join(row))


if __name__ == "__main__":
    main()
