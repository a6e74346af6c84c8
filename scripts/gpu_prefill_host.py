#!/usr/bin/env python
"""Where the 512-token prefill's host time goes (the synthetic 7B q4 runtime as bench builds it): host time
(until the last launch is issued) against GPU time (CUDA events) per prefill, a cProfile of one prefill
(top functions by own time, and the call counts of the launch paths), and whether the whole forward can be
captured in a CUDA graph (then its replay time: the GPU floor of the prefill).

    python scripts/gpu_prefill_host.py [--tokens 512] [--top 28]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from olmo_local.bench_run import random_ids
from olmo_local.bench_synth import build_synthetic
from olmo_local.config import preset
from olmo_local.runtime import make_generator
from olmo_local.state import DecodeState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=28)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--graph-tokens", type=int, nargs="*", default=[512, 2048])
    a = ap.parse_args()
    print(f"host: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
    cfg = preset("7b", max_position_embeddings=65536)
    net = build_synthetic(cfg, "cuda", "q4", torch.bfloat16, seed=0)
    st = DecodeState(cfg, a.ctx, "cuda", net.dtype)
    gen = make_generator(net, st)
    ids = random_ids(a.tokens, cfg.vocab_size, 0)
    with torch.inference_mode():
        for _ in range(3):
            st.reset()
            gen.prefill(ids)
        torch.cuda.synchronize()
        rows = []
        for _ in range(6):
            st.reset()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            gen.prefill(ids)
            e1.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            rows.append(((t1 - t0) * 1e3, (t2 - t0) * 1e3, e0.elapsed_time(e1)))
        for h, w, g in rows:
            print(f"prefill {a.tokens}: host {h:6.1f} ms  wall {w:6.1f} ms  gpu(events) {g:6.1f} ms")
        st.reset()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        gen.prefill(ids)
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        ps = pstats.Stats(pr, stream=s)
        ps.sort_stats("tottime").print_stats(a.top)
        print("\n".join(line[:150] for line in s.getvalue().splitlines() if line.strip())[-6000:])
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        print("\n".join(line[:150] for line in s.getvalue().splitlines() if line.strip())[-5000:])
    graph_vs_eager(net, st, cfg.vocab_size)
    with torch.inference_mode():
        launch_costs()
        for n in a.graph_tokens:
            graph_floor(net, st, n, cfg.vocab_size)


def graph_vs_eager(net, st, vocab: int) -> None:
    """Generator.prefill with the prefill graphs (make_generator's default) against the eager prefill, same
    process: ms per prefill (host until the logits are ready), the first graph run of a bucket capturing;
    and the memory the graphs' pool holds."""
    from olmo_local.prefill_graph import PrefillGraphs

    gen = make_generator(net, st)
    pg = gen.prefill_graphs
    assert isinstance(pg, PrefillGraphs)
    for n in (512, 300, 40):
        ids = random_ids(n, vocab, 2)
        row = {}
        for label, graphs in (("eager", None), ("graph", pg)):
            gen.prefill_graphs = graphs
            ts = []
            for _ in range(5):
                st.reset()
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                lg = gen.prefill(ids)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
                held = torch.cuda.memory_allocated() - before
            row[label] = (ts, lg.float())
            print(f"prefill {n:4d} {label}: ms " + " ".join(f"{t:6.1f}" for t in ts)
                  + f" | held after {held / 2**20:7.1f} MiB")
        d = (row["graph"][1] - row["eager"][1]).abs().max().item()
        print(f"prefill {n:4d}: max |logit graph - eager| {d:.4f} (of {row['eager'][1].abs().max().item():.2f})")
    # a chat turn: 40 tokens continuing after a 512-token prompt
    first, turn = random_ids(512, vocab, 3), random_ids(40, vocab, 4)
    for label, graphs in (("eager", None), ("graph", pg)):
        gen.prefill_graphs = graphs
        ts = []
        for _ in range(5):
            st.reset()
            gen.prefill_graphs = pg
            gen.prefill(first)
            gen.prefill_graphs = graphs
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen.prefill(turn)
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        print(f"turn of 40 after 512 {label}: ms " + " ".join(f"{t:6.1f}" for t in ts))
    gen.prefill_graphs = pg
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, graphs {sorted(pg.graphs)}")


def launch_costs() -> None:
    """Host microseconds per call, back to back on small inputs: a Triton launch (the one-pass RMSNorm,
    the q4 dequantize), a torch elementwise op, F.linear (cuBLAS)."""
    from olmo_local.kernels.dequant import q4_dequantize_triton
    from olmo_local.kernels.norm import rmsnorm_triton

    x = torch.randn(8, 3840, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(3840, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(0, 255, (64, 1920), device="cuda", dtype=torch.uint8)
    sc = torch.ones(64, 30, device="cuda", dtype=torch.float16)
    out = torch.empty(64, 3840, device="cuda", dtype=torch.bfloat16)
    cases = {"triton rmsnorm": lambda: rmsnorm_triton(x, w, 1e-6),
             "triton q4 dequantize": lambda: q4_dequantize_triton(qw, sc, sc, 128, out),
             "torch add": lambda: torch.add(x, x),
             "F.linear 8x3840 @ 64x3840": lambda: torch.nn.functional.linear(x, out)}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name:<28} {(t1 - t0) / 500 * 1e6:6.1f} us per call (host)")


def graph_floor(net, st, n: int, vocab: int) -> None:
    """The whole forward of an n-token prompt (fresh sequence) in a CUDA graph, the state's host-side
    advance left out: what a captured prefill would cost on the GPU."""
    ids = random_ids(n, vocab, 1)
    tok = torch.tensor([ids], device="cuda")
    advance = st.advance
    st.advance = lambda tokens: None
    try:
        s_ = torch.cuda.Stream()
        s_.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s_):
            st.reset()
            net(tok, st, last_only=True)
        torch.cuda.current_stream().wait_stream(s_)
        st.reset()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            net(tok, st, last_only=True)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            st.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.replay()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        print(f"graph replay, {n} tokens, ms: " + " ".join(f"{t:.1f}" for t in ts))
    except Exception as e:  # noqa: BLE001 - a probe: say why capture failed
        print(f"graph capture failed ({n} tokens): {type(e).__name__}: {str(e)[:300]}")
    finally:
        st.advance = advance


if __name__ == "__main__":
    main()
