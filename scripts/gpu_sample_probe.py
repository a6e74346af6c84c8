#!/usr/bin/env python
"""The decode graph's draw on this GPU: kernels.sample (one launch) against the torch form it replaces
(generate.sampling_probs + the exponential race, with the noise drawn by the host's generator before each
replay), per draw at the 7B vocabulary, for peaked logits (a trained model: the top-p set is small) and
flat ones (random weights: tens of thousands of candidates, the kernel's slow path). 50 draws each,
back to back, one CUDA graph per variant.

    python scripts/gpu_sample_probe.py
"""

from __future__ import annotations

import time

import torch

from olmo_local.generate import SamplingParams, sampling_probs
from olmo_local.kernels import sample as ks


def per_draw(fn, pre=None, n=50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    best = 1e9
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            if pre is not None:
                pre()
            g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    v = 100352
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name())
    print(f"{'logits':8s} {'params':28s} {'torch us':>9s} {'kernel us':>10s} {'candidates':>11s}")
    for kind, scale in (("peaked", 3.0), ("flat", 0.3)):
        logits = (torch.randn(v, device="cuda", generator=gen) * scale).to(torch.bfloat16)
        for t, top_p, min_p in ((0.7, 1.0, 0.0), (0.6, 0.95, 0.0), (1.0, 0.9, 0.05)):
            sp = SamplingParams(temperature=t, top_p=top_p, min_p=min_p)
            noise = torch.ones(v, device="cuda")
            nid = torch.zeros(1, dtype=torch.long, device="cuda")
            tok = torch.zeros(1, dtype=torch.long, device="cuda")
            rng = torch.tensor([1, 0], dtype=torch.int64, device="cuda")

            def old():
                probs = sampling_probs(logits.float(), sp)
                lg = (probs / noise).masked_fill(probs == 0, -1.0)
                torch.argmax(lg.view(1, -1), dim=1, out=nid)
                tok.copy_(nid)

            a = per_draw(old, pre=lambda: noise.exponential_(generator=gen))
            b = per_draw(lambda: ks.sample_triton(logits, t, top_p, min_p, rng, nid, tok))
            p = torch.softmax(logits.float() / t, 0)
            n_c = int((p >= 0.5 * (1 - top_p) / v).sum()) if top_p < 1 else v
            print(f"{kind:8s} T {t} top-p {top_p} min-p {min_p:<8} {a:9.1f} {b:10.1f} {n_c:11d}")


if __name__ == "__main__":
    main()
