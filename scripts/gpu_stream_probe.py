#!/usr/bin/env python
"""What tiling streams a 7B-sized weight matrix at full bandwidth? A load-only probe.

Each program reads BN rows x BW int32 words per iteration of its K split and XORs them into an
accumulator (no dequantization math), then stores one word per row. Timing: CUDA-graph replay of
calls that rotate over enough copies of the matrix to defeat the L2. Prints GB/s per (shape, BN, BW,
warps, CTAs per SM) so the q4 GEMV can copy the structure that streams best (kernels/NOTES.md).

    python scripts/gpu_stream_probe.py
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe(w_ptr, y_ptr, NR, KW, WPS, BN: tl.constexpr, BW: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    cols = tl.arange(0, BW)
    rmask = rn < NR
    acc = tl.zeros([BN, BW], dtype=tl.int32)
    k0 = pid_k * WPS
    k1 = tl.minimum(k0 + WPS, KW)
    for k in range(k0, k1, BW):
        m = rmask[:, None] & ((k + cols) < k1)[None, :]
        acc ^= tl.load(w_ptr + rn[:, None] * KW + k + cols[None, :], mask=m, other=0)
    tl.store(y_ptr + pid_k * NR + rn, tl.xor_sum(acc, 1), mask=rmask)


def run(nr: int, kw: int, bn: int, bw: int, nw: int, per_sm: float, sms: int, copies: list, y) -> tuple[float, int]:
    n_blocks = triton.cdiv(nr, bn)
    iters = triton.cdiv(kw, bw)
    split = max(1, min(iters, round(per_sm * sms / n_blocks)))
    wps = triton.cdiv(iters, split) * bw
    split = triton.cdiv(kw, wps)

    def call(w):
        _probe[(split, n_blocks)](w, y, nr, kw, wps, BN=bn, BW=bw, num_warps=nw)

    for w in copies:  # compile + warm
        call(w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    reps = 4
    with torch.cuda.graph(g):
        for _ in range(reps):
            for w in copies:
                call(w)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(copies)))
    us = sorted(ts)[len(ts) // 2]
    return us, split


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    y2 = torch.empty_like(x)
    y2.copy_(x)
    a.record()
    for _ in range(10):
        y2.copy_(x)
    b.record()
    torch.cuda.synchronize()
    copy_gbs = 2 * x.numel() * 10 / (a.elapsed_time(b) * 1e-3) / 1e9
    del x, y2
    print(f"copy {copy_gbs:.0f} GB/s, {sms} SMs")
    # (name, rows, bytes per row) of the q4 7B layers: in-proj, gate|up, down, attn o
    shapes = [("gdn_in q4", 17280, 1920), ("gate_up q4", 22016, 1920), ("down q4", 3840, 5504),
              ("attn_o q4", 3840, 1920)]
    rows = []
    for name, nr, nbytes_row in shapes:
        kw = nbytes_row // 4
        n_copies = max(2, int(160e6 // (nr * nbytes_row)) + 1)
        copies = [torch.randint(-2**31, 2**31 - 1, (nr, kw), dtype=torch.int32, device="cuda") for _ in range(n_copies)]
        y = torch.empty(64 * nr, dtype=torch.int32, device="cuda")
        for bn, bw, nw, per_sm in itertools.product((16, 32, 64, 128), (16, 32, 64), (4, 8), (4, 8, 16)):
            if bn * bw * 4 > 32768:
                continue
            try:
                us, split = run(nr, kw, bn, bw, nw, per_sm, sms, copies, y)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} bn={bn} bw={bw} nw={nw}: {type(exc).__name__}")
                continue
            gbs = nr * nbytes_row / (us * 1e-6) / 1e9
            rows.append((name, bn, bw, nw, per_sm, split, us, gbs))
        del copies
        torch.cuda.empty_cache()
    print(f"{'shape':<12}{'BN':>5}{'BW':>5}{'B/row/it':>9}{'KB/CTA-it':>10}{'warps':>6}{'CTA/SM':>7}{'split':>6}{'us':>8}{'GB/s':>8}{'%copy':>7}")
    for name in dict.fromkeys(r[0] for r in rows):
        sel = sorted([r for r in rows if r[0] == name], key=lambda r: r[6])
        for r in sel[:8] + sel[-2:]:
            n, bn, bw, nw, per_sm, split, us, gbs = r
            print(f"{n:<12}{bn:>5}{bw:>5}{4 * bw:>9}{bn * bw * 4 / 1024:>10.0f}{nw:>6}{per_sm:>7}{split:>6}"
                  f"{us:>8.2f}{gbs:>8.0f}{100 * gbs / copy_gbs:>7.1f}")
        q4like = [r for r in sel if r[1] == 64 and r[2] == 16 and r[3] == 4]
        for r in q4like:
            print(f"{'  (q4 tile)':<12}{r[1]:>5}{r[2]:>5}{64:>9}{4:>10}{r[3]:>6}{r[4]:>7}{r[5]:>6}{r[6]:>8.2f}{r[7]:>8.0f}"
                  f"{100 * r[7] / copy_gbs:>7.1f}")


if __name__ == "__main__":
    main()
