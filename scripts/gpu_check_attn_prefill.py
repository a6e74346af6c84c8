#!/usr/bin/env python
"""GPU check of the block-wise prefill attention over an int8 KV cache (kernels/attention_prefill.py):
flash-attention blocks merged by log-sum-exp vs one SDPA call over the whole dequantized cache, at
the 7B attention shape (30 heads x 128), a 1024-token chunk, several depths: relative error, time and
the peak extra memory of each."""

import torch

from olmo_local.kernels import attention_prefill as ap
from olmo_local.kernels.attention_decode import quantize_kv_int8


def peak(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(3):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return out, extra, ev[0].elapsed_time(ev[1]) / 3


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    h, hd, t = 30, 128, 1024
    fails = 0
    for pos in (4096, 16384, 31744):
        cap = pos + t
        kq, ks = quantize_kv_int8(torch.randn(h, cap, hd, device="cuda", generator=g, dtype=torch.bfloat16) * 2)
        vq, vs = quantize_kv_int8(torch.randn(h, cap, hd, device="cuda", generator=g, dtype=torch.bfloat16))
        q = torch.randn(1, h, t, hd, device="cuda", generator=g, dtype=torch.bfloat16)
        a, ma, ta = peak(lambda: ap.attention_over_int8_cache(q, kq, ks, vq, vs, pos))
        b, mb, tb = peak(lambda: ap._sdpa_reference(q, kq, ks, vq, vs, pos))
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        ok = rel < 1e-2 and torch.isfinite(a).all().item()
        fails += not ok
        print(f"[{'PASS' if ok else 'FAIL'}] depth {pos:6d} + {t}: rel {rel:.2e} · blockwise {ta:7.2f} ms, "
              f"+{ma / 2**20:7.1f} MiB · one SDPA {tb:7.2f} ms, +{mb / 2**20:7.1f} MiB")
    return fails


if __name__ == "__main__":
    raise SystemExit(main())
