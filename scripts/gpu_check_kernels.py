#!/usr/bin/env python
"""Check and time the decode kernels at the real Olmo Hybrid 7B shapes on one GPU (H100/H200).

    python scripts/gpu_check_kernels.py              # all checks, ~1-2 minutes
    python scripts/gpu_check_kernels.py --only q4    # names containing "q4"
    python scripts/gpu_check_kernels.py --sweep      # also try a few q4/q8/attention block configs
    python scripts/gpu_check_kernels.py --dry-run    # CPU: tiny shapes in the Triton interpreter
    python scripts/gpu_check_kernels.py --aot        # any machine: sm_90 builds, registers / SASS counts

For each op: Triton kernel vs the torch reference on fresh random inputs (relative error
||y - ref|| / ||ref||; bf16 outputs pass at <= 1e-2, fp32 states at <= 1e-4), then timing.
Timing = CUDA-graph replay of many calls that rotate over several copies of the big operand
(so the 50 MB L2 does not serve the weights), median over replays; the graph's last output is also
compared with an eager call (counters and workspaces survive replay). "eager" is
triton.testing.do_bench's median on one operand copy (includes launch overhead, L2-warm).
GB/s = bytes the op must move (each input once, each output once) / graph time.
A final table and a kernel-only per-token estimate are printed last; with $OUT set, results are
also written to $OUT/gpu_check_kernels.json.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--only", default="", help="run the checks whose name contains this text")
    p.add_argument("--sweep", action="store_true", help="also time a few alternative block configs")
    p.add_argument("--layouts", action="store_true",
                   help="q4 tensor-core GEMV: standard vs tiled weight layout, hand prefetch vs pipelined stages")
    p.add_argument("--reps", type=int, default=10, help="graph replays to take the median of")
    p.add_argument("--aot", action="store_true",
                   help="no GPU needed: compile the kernels for sm_90 and summarise their SASS (registers, "
                        "spills, instructions in the main loop)")
    p.add_argument("--arch", type=int, default=90,
                   help="with --aot: the compute capability to build for (86 / 89: consumer Ampere / Ada, whose "
                        "blocks get at most 99 KB of shared memory; 80: A100; no PDL below 90)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import torch


def import_kernels():
    """olmo_local.kernels, also from a plain checkout that is not pip-installed."""
    try:
        return importlib.import_module("olmo_local.kernels")
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    importlib.import_module("olmo_local")
    spec = importlib.util.spec_from_file_location(
        "olmo_local.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["olmo_local.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


K = import_kernels()
kq4 = importlib.import_module(os.environ.get("Q4_MODULE", "olmo_local.kernels.gemv_q4"))
kq8 = importlib.import_module("olmo_local.kernels.gemv_q8")
knf4 = importlib.import_module("olmo_local.kernels.gemv_nf4")
kgdn = importlib.import_module("olmo_local.kernels.gdn_decode")
katt = importlib.import_module("olmo_local.kernels.attention_decode")
knorm = importlib.import_module("olmo_local.kernels.norm")
kgr = importlib.import_module("olmo_local.kernels.gdn_recurrent")
kac = importlib.import_module("olmo_local.kernels.attention_cached")

CUDA = torch.cuda.is_available() and not ARGS.dry_run
DEV = torch.device("cuda" if CUDA else "cpu")
BF16 = torch.bfloat16 if CUDA else torch.float32  # the interpreter's bf16 arithmetic is not exact
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 3 * L2_BYTES  # operand copies per timed graph cover at least this much


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def gen() -> torch.Generator:
    g = torch.Generator(device=DEV)
    g.manual_seed(int(time.time_ns()) % (2**31))  # fresh inputs each run
    return g


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


# ------------------------------------------------------------------------------------------- timing
def bench_graph(calls, n_iter: int, reps: int) -> tuple[float, bool]:
    """Median microseconds per call over graph replays of n_iter calls cycling through `calls`."""
    if not CUDA:
        t0 = time.perf_counter()
        calls[0]()
        return (time.perf_counter() - t0) * 1e6, True
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # compile, allocate workspaces, outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_iter):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / n_iter)
    del graph
    return statistics.median(times), True


def bench_eager(call) -> float:
    if not CUDA:
        return float("nan")
    import triton.testing

    try:
        return triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median") * 1000.0
    except TypeError:  # older signature
        return triton.testing.do_bench(call, warmup=10, rep=40, quantiles=[0.5]) * 1000.0


def copy_bandwidth() -> float:
    if not CUDA:
        return float("nan")
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return 2 * a.numel() / (statistics.median(ts) * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------- checks
RESULTS: list[dict] = []


def n_copies(nbytes: int, cap: int = 8) -> int:
    return 1 if not CUDA else max(1, min(cap, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def record(name, errs, tol, calls, last_out, eager_check, nbytes, note=""):
    """errs: {label: error}; tol: a bound for all of them or {label: bound};
    calls: list of zero-arg kernel calls (one per operand copy);
    last_out(): the output after the graph ran; eager_check(): output of an eager call on the copy
    the graph's last call used (or None to skip)."""
    n_iter = max(len(calls), 24) if CUDA else 1
    n_iter = math.ceil(n_iter / len(calls)) * len(calls)
    try:
        us, _ = bench_graph(calls, n_iter, ARGS.reps)
        graph_ok = True
        if eager_check is not None:
            after_graph = last_out().clone()
            again = eager_check()
            errs["graph==eager"] = relerr(after_graph, again) if again.abs().sum() > 0 else 0.0
            graph_ok = torch.equal(after_graph, again)
        eager_us = bench_eager(calls[0])
    except Exception as exc:  # noqa: BLE001  (keep going: report the failure)
        us, eager_us, graph_ok = float("nan"), float("nan"), False
        note = f"{note} timing failed: {type(exc).__name__}: {exc}"[:200]
    tols = tol if isinstance(tol, dict) else {k: tol for k in errs}
    ok = all(e <= tols[k] for k, e in errs.items() if k != "graph==eager") and graph_ok
    gbs = nbytes / (us * 1e-6) / 1e9 if not math.isnan(us) else float("nan")
    row = {"name": name, "ok": ok, "errs": errs, "tol": tol, "us": us, "eager_us": eager_us, "bytes": nbytes, "gbs": gbs, "note": note}
    RESULTS.append(row)
    err_txt = " ".join(f"{k}={v:.2e}" for k, v in errs.items())
    print(f"[{'PASS' if ok else 'FAIL'}] {name:<28} {err_txt}  graph {us:9.2f} us  eager {eager_us:9.2f} us  "
          f"{nbytes / 1e6:9.2f} MB  {gbs:8.1f} GB/s {note}", flush=True)
    return row


def fail(name, exc):
    RESULTS.append({"name": name, "ok": False, "errs": {}, "tol": 0, "us": float("nan"), "eager_us": float("nan"), "bytes": 0,
                        "gbs": float("nan"), "note": f"{type(exc).__name__}: {exc}"[:300]})
    print(f"[FAIL] {name:<28} {type(exc).__name__}: {exc}", flush=True)


def q4_weights(n, k, group, g):
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV, generator=g)
    scales = (torch.rand(n, k // group, device=DEV, generator=g) * 0.004 + 0.004).half()
    mins = (-scales.float() * (6 + 3 * torch.rand(n, k // group, device=DEV, generator=g))).half()
    return qw, scales, mins


def check_q4(name, k, n, t=1, gated=False, group=128, **tune):
    g = gen()
    nbytes_w = n * k // 2 + 2 * 2 * n * (k // group)
    copies = [q4_weights(n, k, group, g) for _ in range(n_copies(nbytes_w))]
    if tune.get("tiled"):  # the layout the model uses on CUDA (gemv_q4.q4_tile)
        copies = [kq4.q4_tile(*c, group) for c in copies]
    x = randn(t, k, g=g, dtype=BF16)
    nout = n // 2 if gated else n
    out = torch.empty(t, nout, dtype=BF16, device=DEV)
    kern = kq4.q4_gemv_silu_mul_triton if gated else kq4.q4_gemv_triton
    ref = kq4.q4_gemv_silu_mul_ref if gated else kq4.q4_gemv_ref
    out.fill_(float("nan"))
    y = kern(x, *copies[0], group, out, **tune).clone()
    errs = {"rel": relerr(y, ref(x, *copies[0], group, tiled=bool(tune.get("tiled"))))}
    calls = [lambda c=c: kern(x, *c, group, out, **tune) for c in copies]
    nbytes = nbytes_w + t * k * 2 + t * nout * 2
    # the graph's n_iter is a multiple of len(calls): its last call used the last copy
    return record(name, errs, 1e-2, calls, lambda: out,
                  lambda: kern(x, *copies[-1], group, out.clone(), **tune), nbytes, _tune_note(tune))


def check_q8(name, k, n, t=1, gated=False, group=0, **tune):
    g = gen()
    ns = k // group if group else 1  # group scales [n, k/G] (what quantize writes) or one per row
    nbytes_w = n * k + 2 * n * ns
    copies = []
    for _ in range(n_copies(nbytes_w)):
        qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV, generator=g)
        shape = (n, ns) if group else (n,)
        s = (torch.rand(shape, device=DEV, generator=g) * 2e-4 + 1e-4).half()
        copies.append((qw, s))
    x = randn(t, k, g=g, dtype=BF16)
    nout = n // 2 if gated else n
    out = torch.empty(t, nout, dtype=BF16, device=DEV)
    kern = kq8.q8_gemv_silu_mul_triton if gated else kq8.q8_gemv_triton
    ref = kq8.q8_gemv_silu_mul_ref if gated else kq8.q8_gemv_ref
    out.fill_(float("nan"))
    y = kern(x, *copies[0], out, **tune).clone()
    errs = {"rel": relerr(y, ref(x, *copies[0]))}
    calls = [lambda c=c: kern(x, *c, out, **tune) for c in copies]
    nbytes = nbytes_w + t * k * 2 + t * nout * 2
    return record(name, errs, 1e-2, calls, lambda: out, lambda: kern(x, *copies[-1], out.clone(), **tune), nbytes,
                  _tune_note(tune))


def _tune_note(tune):
    return " ".join(f"{k}={v}" for k, v in tune.items())


def check_gdn(name, hk=30, hv=30, dk=96, dv=192, kconv=4, **tune):
    g = gen()
    c = 2 * hk * dk + hv * dv
    state_bytes = hv * dk * dv * 4
    layers = []
    for _ in range(n_copies(2 * state_bytes, cap=24)):  # one copy per GDN layer of the model at most
        layers.append({
            "conv_weight": randn(c, kconv, g=g, dtype=BF16, scale=0.5),
            "conv_state": randn(c, kconv - 1, g=g, dtype=BF16),
            "A_log": torch.rand(hv, device=DEV, generator=g) * 2.5,
            "dt_bias": randn(hv, g=g, scale=0.5),
            "norm_weight": (1 + randn(dv, g=g, scale=0.1)).to(BF16),
            "rec_state": randn(hv, dk, dv, g=g, scale=0.1),
        })
    proj = randn(c + hv * dv + 2 * hv, g=g, dtype=BF16)  # one projection row: q|k|v, z, a, b
    qkv, z = proj[:c], proj[c:c + hv * dv]
    a, b = proj[c + hv * dv:c + hv * dv + hv], proj[c + hv * dv + hv:]
    out = torch.empty(hv * dv, dtype=BF16, device=DEV)

    def run(layer, o, fn=kgdn.gdn_decode_step_triton, **kw):
        return fn(qkv, z, a, b, layer["conv_weight"], layer["conv_state"], layer["A_log"], layer["dt_bias"],
                  layer["norm_weight"], layer["rec_state"], True, o, **kw)

    l0 = layers[0]
    ref_layer = {k: v.clone() for k, v in l0.items()}
    y = run(l0, out, **tune).clone()
    r = run(ref_layer, None, kgdn.gdn_decode_step_ref)
    errs = {
        "rel": relerr(y, r),
        "state": relerr(l0["rec_state"], ref_layer["rec_state"]),
        "conv": relerr(l0["conv_state"], ref_layer["conv_state"]),
    }
    calls = [lambda lay=lay: run(lay, out, **tune) for lay in layers]
    nbytes = 2 * state_bytes + 2 * c * (kconv - 1) * 2 + c * kconv * 2 + (c + hv * dv + 2 * hv) * 2 + hv * dv * 2
    # output in bf16; the fp32 state and the (copied) conv state must match closely
    return record(name, errs, {"rel": 1e-2, "state": 1e-4, "conv": 0.0}, calls, lambda: out, None, nbytes,
                  _tune_note(tune))


def check_attention(name, length, h=30, kvh=30, hd=128, max_ctx=32768, int8=False, **tune):
    g = gen()
    elt = 1 if int8 else 2
    kv_bytes = 2 * kvh * length * hd * elt + (2 * kvh * length * 4 if int8 else 0)
    caches = []
    for _ in range(n_copies(kv_bytes, cap=4)):
        kc = randn(kvh, max_ctx, hd, g=g, dtype=BF16)
        vc = randn(kvh, max_ctx, hd, g=g, dtype=BF16)
        if int8:
            kq, ks = katt.quantize_kv_int8_ref(kc)
            vq, vs = katt.quantize_kv_int8_ref(vc)
            del kc, vc
            caches.append((kq, vq, {"k_scale": ks, "v_scale": vs}))
        else:
            caches.append((kc, vc, {}))
    q = randn(h, hd, g=g, dtype=BF16)
    n = torch.tensor([length], dtype=torch.int32, device=DEV)
    out = torch.empty(h, hd, dtype=BF16, device=DEV)
    kc, vc, sc = caches[0]
    y = katt.attention_decode_triton(q, kc, vc, n, out, **sc, **tune).clone()
    errs = {"rel": relerr(y, katt.attention_decode_ref(q, kc, vc, n, **sc))}
    calls = [lambda c=c: katt.attention_decode_triton(q, c[0], c[1], n, out, **c[2], **tune) for c in caches]
    last = caches[-1]
    nbytes = kv_bytes + 2 * h * hd * 2
    return record(name, errs, 1e-2, calls, lambda: out,
                  lambda: katt.attention_decode_triton(q, last[0], last[1], n, out.clone(), **last[2], **tune),
                  nbytes, _tune_note(tune))


def check_quantize_kv(name, kvh=30, hd=128, max_ctx=32768):
    g = gen()
    k = randn(kvh, 1, hd, g=g, dtype=BF16)
    qc = torch.zeros(kvh, max_ctx, hd, dtype=torch.int8, device=DEV)
    sc = torch.zeros(kvh, max_ctx, dtype=torch.float32, device=DEV)
    pos = torch.tensor([max_ctx // 3], dtype=torch.int32, device=DEV)
    katt.quantize_kv_int8_triton(k, out=(qc, sc), pos=pos)
    qr, sr = katt.quantize_kv_int8_ref(k)
    p = max_ctx // 3
    errs = {
        "codes_off": float((qc[:, p:p + 1].int() - qr.int()).abs().max().item()),  # <= 1 (rounding ties)
        "scale": relerr(sc[:, p:p + 1], sr),
    }
    calls = [lambda: katt.quantize_kv_int8_triton(k, out=(qc, sc), pos=pos)]
    return record(name, errs, {"codes_off": 1.0, "scale": 1e-5}, calls, lambda: sc, None, kvh * hd * (2 + 1) + kvh * 4)


def check_norms(name, d=3840, rows=1):
    g = gen()
    x = randn(rows, d, g=g, dtype=BF16, scale=3)
    r = randn(rows, d, g=g, dtype=BF16)
    w = (1 + randn(d, g=g, scale=0.1)).to(BF16)
    out = torch.empty_like(x)
    res_out = torch.empty_like(r)
    errs = {
        "rmsnorm": relerr(knorm.rmsnorm_triton(x, w, 1e-6), knorm.rmsnorm_ref(x, w, 1e-6)),
    }
    n1, r1 = knorm.add_rmsnorm_triton(x, r, w, 1e-6)
    n2, r2 = knorm.add_rmsnorm_ref(x, r, w, 1e-6)
    errs["add_rms"] = max(relerr(n1, n2), relerr(r1, r2))
    errs["rms_add"] = relerr(knorm.rmsnorm_add_triton(x, r, w, 1e-6), knorm.rmsnorm_add_ref(x, r, w, 1e-6))
    calls = [lambda: knorm.add_rmsnorm_triton(x, r, w, 1e-6, out, res_out)]
    return record(name, errs, 1e-2, calls, lambda: out,
                  lambda: knorm.add_rmsnorm_triton(x, r, w, 1e-6, out.clone(), res_out.clone())[0],
                  rows * d * 2 * 4 + d * 2, "(timed: add_rmsnorm)")


# ------------------------------------------------------------------------------------------- plan
def plan():
    if CUDA:
        q4 = [
            ("q4 gdn_in 3840x17280", 3840, 17280, 1, False),
            ("q4 attn_qkv 3840x11520", 3840, 11520, 1, False),
            ("q4 gate_up+silu 3840x22016", 3840, 22016, 1, True),
            ("q4 gate_up+silu T=4", 3840, 22016, 4, True),
            ("q4 down 11008x3840", 11008, 3840, 1, False),
            ("q4 gdn_o 5760x3840", 5760, 3840, 1, False),
            ("q4 attn_o 3840x3840", 3840, 3840, 1, False),
            ("q4 attn_o T=8", 3840, 3840, 8, False),
        ]
        q8 = [
            ("q8 lm_head 3840x100352", 3840, 100352, 1, False),
            ("q8 gate_up+silu 3840x22016", 3840, 22016, 1, True),
            ("q8 down 11008x3840", 11008, 3840, 1, False),
        ]
        gdn = {"hk": 30, "hv": 30, "dk": 96, "dv": 192}
        att = {"h": 30, "kvh": 30, "hd": 128, "max_ctx": 32768}
        lengths = [1, 4096, 32768]
        int8_lengths = [4096, 32768]
        norm_d = 3840
    else:  # interpreter: same code paths, tiny shapes
        q4 = [("q4 tiny", 256, 96, 1, False), ("q4 tiny gated T=3", 384, 64, 3, True)]
        q8 = [("q8 tiny", 160, 80, 1, False), ("q8 tiny gated", 128, 64, 2, True)]
        gdn = {"hk": 2, "hv": 4, "dk": 12, "dv": 20}
        att = {"h": 4, "kvh": 2, "hd": 16, "max_ctx": 128}
        lengths = [1, 77]
        int8_lengths = [77]
        norm_d = 300
    checks = []
    for nm, k, n, t, gated in q4:
        checks.append((nm, lambda k=k, n=n, t=t, gated=gated, nm=nm: check_q4(nm, k, n, t, gated)))
    for nm, k, n, t, gated in q8:
        checks.append((nm, lambda k=k, n=n, t=t, gated=gated, nm=nm: check_q8(nm, k, n, t, gated)))
    if CUDA:  # the head as `olmo-local quantize` writes it: scales per group of 128
        checks.append(("q8 lm_head g128 3840x100352",
                       lambda: check_q8("q8 lm_head g128 3840x100352", 3840, 100352, group=128)))
    checks.append(("gdn_step", lambda: check_gdn("gdn_step", **gdn)))
    for length in lengths:
        nm = f"attn bf16 L={length}"
        checks.append((nm, lambda length=length, nm=nm: check_attention(nm, length, **att)))
    for length in int8_lengths:
        nm = f"attn int8 L={length}"
        checks.append((nm, lambda length=length, nm=nm: check_attention(nm, length, int8=True, **att)))
    checks.append(("quantize_kv_int8", lambda: check_quantize_kv("quantize_kv_int8", att["kvh"], att["hd"],
                                                                  att["max_ctx"])))
    checks.append((f"norms d={norm_d}", lambda: check_norms(f"norms d={norm_d}", norm_d)))
    if ARGS.layouts and CUDA:
        variants = [("std pf", {}), ("std pf quad", dict(gate_halves=False)), ("til pf", dict(tiled=True)),
                    ("til pf quad", dict(tiled=True, gate_halves=False)),
                    ("til pf2", dict(tiled=True, prefetch_depth=2)),
                    ("til pf w8", dict(tiled=True, block_n=128, num_warps=8)),
                    ("til pf2 w8", dict(tiled=True, prefetch_depth=2, block_n=128, num_warps=8)),
                    ("til pf2 w2", dict(tiled=True, prefetch_depth=2, block_n=32, num_warps=2))]
        for tag, k, n, gated in (("gdn_in", 3840, 17280, False), ("qkv", 3840, 11520, False),
                                 ("gate_up", 3840, 22016, True), ("down", 11008, 3840, False),
                                 ("gdn_o", 5760, 3840, False), ("attn_o", 3840, 3840, False)):
            for vname, tune in variants:
                if "quad" in vname and not gated:
                    continue
                nm = f"lay {tag} {vname}"
                checks.append((nm, lambda k=k, n=n, gated=gated, nm=nm, tune=tune:
                               check_q4(nm, k, n, gated=gated, **tune)))
    if ARGS.layouts and CUDA:  # the 3840-row GEMVs (split-K heavy) and the GDN step's tile
        for tag, k in (("down", 11008), ("gdn_o", 5760), ("attn_o", 3840)):
            for split in (3, 6, 10, 20):
                nm = f"lay {tag} til split{split}"
                checks.append((nm, lambda k=k, nm=nm, split=split: check_q4(nm, k, 3840, tiled=True, split_k=split)))
        for bv, nw in ((32, 4), (64, 4), (64, 8), (128, 8), (256, 8), (256, 16)):
            nm = f"lay gdn bv{bv} w{nw}"
            checks.append((nm, lambda bv=bv, nw=nw, nm=nm: check_gdn(nm, block_v=bv, num_warps=nw, **gdn)))
    if ARGS.sweep and CUDA:
        shapes = ((3840, 17280, False), (3840, 22016, True), (11008, 3840, False), (5760, 3840, False))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for k, n, gated in shapes:
            rows = n // 2 if gated else n
            for bn, nw, per_sm in [c for c in itertools.product((32, 64, 128), (2, 4, 8), (4, 8, 16)) if c[0] % (16 * c[1]) == 0]:
                split = max(1, min(k // 128, round(per_sm * sms / -(-rows // bn))))
                nm = f"sweep q4 mma{' gated' if gated else ''} {k}x{n}"
                checks.append((nm, lambda k=k, n=n, bn=bn, nw=nw, split=split, nm=nm, gated=gated:
                               check_q4(nm, k, n, gated=gated, block_n=bn, num_warps=nw, mma=True,
                                        split_k=split)))
        for split in (4, 8, 16, 32):
            nm = "sweep q4 11008x3840"
            checks.append((nm, lambda split=split, nm=nm: check_q4(nm, 11008, 3840, split_k=split)))
        for bn, bk in ((32, 128), (64, 128), (32, 256), (16, 256)):
            nm = "sweep q8 3840x100352"
            checks.append((nm, lambda bn=bn, bk=bk, nm=nm: check_q8(nm, 3840, 100352, block_n=bn, block_k=bk)))
        for int8 in (False, True):
            for length in (4096, 32768):
                for ns in (9, 18, 36):
                    for bs in (32, 64, 128):
                        nm = f"sweep attn {'int8' if int8 else 'bf16'} L={length}"
                        checks.append((nm, lambda ns=ns, bs=bs, nm=nm, length=length, int8=int8: check_attention(
                            nm, length, int8=int8, num_splits=ns, block_s=bs, **att)))
        for bv in (16, 32, 64):
            checks.append(("sweep gdn", lambda bv=bv: check_gdn("sweep gdn", block_v=bv, **gdn)))
    return checks


def per_token_estimate():
    """Kernel-only decode-step time from the table (24 GDN + 8 attention layers, q4, q8 head)."""
    t = {r["name"]: r["us"] for r in RESULTS}
    need = ["q4 gdn_in 3840x17280", "q4 attn_qkv 3840x11520", "q4 gate_up+silu 3840x22016", "q4 down 11008x3840",
            "q4 gdn_o 5760x3840", "q4 attn_o 3840x3840", "q8 lm_head 3840x100352", "gdn_step", "norms d=3840"]
    if not all(k in t and not math.isnan(t[k]) for k in need):
        return
    norm = t["norms d=3840"]
    mlp = t["q4 gate_up+silu 3840x22016"] + t["q4 down 11008x3840"]
    gdn_layer = t["q4 gdn_in 3840x17280"] + t["gdn_step"] + t["q4 gdn_o 5760x3840"] + mlp + 2 * norm
    for length in (1, 4096, 32768):
        key = f"attn bf16 L={length}"
        if key not in t:
            continue
        attn_layer = t["q4 attn_qkv 3840x11520"] + 2 * norm + t[key] + t["q4 attn_o 3840x3840"] + mlp + 2 * norm
        head = t.get("q8 lm_head g128 3840x100352", t["q8 lm_head 3840x100352"])
        total = 24 * gdn_layer + 8 * attn_layer + norm + head
        print(f"kernel-only decode step at L={length:>5}: {total:8.1f} us  -> {1e6 / total:6.1f} tok/s "
              f"(gdn layer {gdn_layer:.1f} us, attn layer {attn_layer:.1f} us; a/b proj and launches not counted)")


# ------------------------------------------------------------------------------------------- --aot
def aot_report() -> int:
    """Compile the decode kernels for sm_90 (or --arch) with the installed Triton (its bundled ptxas) and print
    registers, spills, shared memory (more than the architecture gives one block fails) and the instruction mix
    of each main loop. Needs no GPU."""
    import collections
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def build(fn, types, consts, num_warps, div16=()):
        names = fn.arg_names
        if "USE_PDL" in names and "USE_PDL" not in consts:
            consts = {**consts, "USE_PDL": ARGS.arch >= 90}  # as launched in the decode step (PDL: Hopper on)
        if "TR" in names and "TR" not in consts:
            consts = {**consts, "TR": 0}  # the standard q4 layout
        for knob, default in (("STAGES", 1), ("GHALF", False), ("PF2", False), ("AB_ONCE", False), ("EARLY", True),
                              ("SPLITP", 16), ("RSTD", False), ("NSSP", 16), ("FOLD", 0), ("AB_RSTD", False), ("FPRE", False), ("PW2", False),
                              ("DENSE", False), ("BKW", 1), ("CONV", False), ("KC", 4), ("KP", 4),
                              ("HEADNORM", 0), ("NVB", 1), ("LATE_STORES", True), ("FOLDED", False),
                              ("RSUM", False), ("PREP", False), ("KV_PRE", False),
                              ("EARLY", True)):
            if knob in names and knob not in consts and knob not in types:
                consts = {**consts, knob: default}
        sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
        cst = {(names.index(k),): v for k, v in consts.items()}
        # what the JIT assumes at run time for 16-aligned pointers and ints divisible by 16
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if types.get(n, "").startswith("*") or n in div16}
        return triton.compile(ASTSource(fn, sig, cst, attrs), target=GPUTarget("cuda", ARGS.arch, 32),
                              options={"num_warps": num_warps, "num_stages": 2})

    def sass_summary(kernel):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            res = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                                 capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        ins = [(int(a, 16), b.strip()) for a, b in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
        loops = []
        for addr, text in ins:
            b = re.search(r"BRA (0x[0-9a-f]+)", text)
            if b and int(b.group(1), 16) < addr:
                body = [t for a, t in ins if int(b.group(1), 16) <= a <= addr]
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
                spills = sum(v for k, v in ops.items() if k.startswith(("LDL", "STL")))  # local memory in the loop
                loops.append(f"loop {len(body)} instr: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
                             + (f"; local loads/stores {spills}" if spills else ""))
        shared = max(int(m.group(3)), int(getattr(kernel.metadata, "shared", 0) or 0))
        return f"regs {m.group(1)} stack {m.group(2)} local {m.group(4)} shared {shared}", loops, shared

    q4_types = {"x_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "y_ptr": "*bf16",
                "part_ptr": "*fp32", "cnt_ptr": "*i32", "NR": "i32", "NGR": "i32", "stride_x": "i32",
                "stride_y": "i32", "GPS": "i32", "SPLIT": "i32", "MAGIC": "i32", "rss_ptr": "*fp32", "NSS": "i32",
                "eps_r": "fp32", "res_ptr": "*bf16", "fw_ptr": "*bf16", "xt_ptr": "*bf16", "ss_ptr": "*fp32",
                "wd_ptr": "*i32", "d_ptr": "*fp32", "ND": "i32", "NB": "i32", "cw_ptr": "*bf16", "cs_ptr": "*bf16",
                "act_ptr": "*fp32", "NCONV": "i32", "hs_ptr": "*fp32", "DV": "i32", "eps_h": "fp32",
                "rsum_ptr": "*fp32", "NQS": "i32", "NKS": "i32"}
    q8_types = {"x_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*fp16", "y_ptr": "*bf16", "part_ptr": "*fp32",
                "cnt_ptr": "*i32", "NR": "i32", "KW": "i32", "stride_x": "i32", "stride_y": "i32", "WPS": "i32",
                "SPLIT": "i32", "MAGIC": "i32"}
    gdn_types = {"qkv_ptr": "*bf16", "z_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "cw_ptr": "*bf16",
                 "cs_ptr": "*bf16", "alog_ptr": "*fp32", "dtb_ptr": "*fp32", "nw_ptr": "*bf16", "s_ptr": "*fp32",
                 "out_ptr": "*bf16", "ows_ptr": "*fp32", "cnt_ptr": "*i32", "HK": "i32", "DK": "i32", "DV": "i32",
                 "R": "i32", "NVB": "i32", "q_scale": "fp32", "u_ptr": "*bf16", "wab_ptr": "*bf16", "D": "i32",
                 "rss_ptr": "*fp32", "NSS": "i32", "eps_r": "fp32", "stride_sk": "i32", "stride_sv": "i32",
                 "hs_ptr": "*fp32"}
    att_types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                 "len_ptr": "*i32", "out_ptr": "*bf16", "mws_ptr": "*fp32", "lws_ptr": "*fp32", "aws_ptr": "*fp32",
                 "cnt_ptr": "*i32", "stride_qh": "i32", "stride_kh": "i32", "stride_kt": "i32", "stride_vh": "i32",
                 "stride_vt": "i32", "stride_ksh": "i32", "stride_vsh": "i32", "stride_oh": "i32",
                 "sm_scale": "fp32", "HD": "i32", "pos_ptr": "*i32", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
                 "ss_ptr": "*fp32", "NSS": "i32", "eps_q": "fp32", "eps_k": "fp32", "NQ": "i32", "NK": "i32",
                 "kcw_ptr": "*bf16", "vcw_ptr": "*bf16"}
    att_div = ("stride_qh", "stride_kh", "stride_kt", "stride_vh", "stride_vt", "stride_ksh", "stride_vsh",
               "stride_oh", "HD")
    prep_types = {"qkv_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "qo_ptr": "*bf16", "kc_ptr": "*i8",
                  "vc_ptr": "*i8", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "pos_ptr": "*i32", "len_ptr": "*i32",
                  "eps_q": "fp32", "eps_k": "fp32", "NQ": "i32", "NK": "i32", "HD": "i32", "stride_kh": "i32",
                  "stride_kt": "i32", "stride_vh": "i32", "stride_vt": "i32", "stride_ksh": "i32", "stride_vsh": "i32"}
    norm_types = {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ro_ptr": "*bf16",
                  "D": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
                  "stride_ro": "i32", "w2_ptr": "*bf16", "eps2": "fp32"}
    rec_types = {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                 "alog_ptr": "*fp32", "dtb_ptr": "*fp32", "s_ptr": "*fp32", "o_ptr": "*fp32", "T": "i32", "HV": "i32",
                 "REP": "i32", "DK": "i32", "DV": "i32", "sa_b": "i32", "sa_t": "i32", "sb_b": "i32", "sb_t": "i32",
                 "beta_scale": "fp32", "stride_sk": "i32", "stride_sv": "i32"}
    ac_types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "ks_ptr": "*i64", "vs_ptr": "*i64",
                "o_ptr": "*bf16", "pos_ptr": "*i64", "T": "i32", "HD": "i32", "sq_h": "i32", "sq_t": "i32",
                "sk_h": "i32", "sk_s": "i32", "sv_h": "i32", "sv_s": "i32", "sks_h": "i32", "svs_h": "i32",
                "so_h": "i32", "so_t": "i32", "scale": "fp32"}
    ac_div = ("HD", "sq_h", "sq_t", "sk_h", "sk_s", "sv_h", "sv_s", "so_h", "so_t")
    nf4_types = {"x_ptr": "*i32", "w_ptr": "*i32", "am_ptr": "*fp32", "code_ptr": "*fp32", "y_ptr": "*bf16",
                 "part_ptr": "*fp32", "cnt_ptr": "*i32", "NR": "i32", "KW": "i32", "WPS": "i32", "SPLIT": "i32",
                 **{t: "i32" for t in ("t0", "t1", "t2", "t3", "l0", "l1", "l2", "l3")}}
    tcw = {"T": 1, "G": 128, "SPLIT_K": True, "X_BF16": True, "ASM": True, "PAIRS": False, "GPI": 1, "MMA": True,
           "PREFETCH": True, "TR": 64}
    jobs = [
        ("q4 T=1 (64 rows x 128 cols / iter)", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": False, "X_BF16": True, "ASM": True, "PAIRS": False, "GPI": 1, "MMA": False, "PREFETCH": False}, 4, ()),
        ("q4 T=1 tensor cores (mma)", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": False, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True}, 4, ()),
        ("q4 gate|up+silu T=1 tensor cores", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True}, 4, ()),
        ("q4 T=1 tensor cores, tiled layout", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": False, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True, "TR": 64}, 4, ()),
        ("q4 gate|up+silu tensor cores, tiled", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True, "TR": 64}, 4, ()),
        ("q4 gate|up+silu tc tiled gate halves", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True, "TR": 64, "GHALF": True}, 4, ()),
        ("q4 tc tiled wide, folded-norm producer", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 256, "SPLIT_K": True, "GATED": False, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True, "TR": 64, "FOLD": 2}, 4, ()),
        # session 8: the fold producer's preloaded rows, prefetch two ahead (64 / 32 rows per warp), and two
        # groups before the PDL wait (tcw: the tiled tensor-core path's common constants)
        ("q4 tc tiled wide, producer, preloaded rows", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, FOLD=2, FPRE=True), 4, ()),
        ("q4 tc tiled wide 64 rows/warp, prefetch 2 ahead", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PF2=True), 4, ()),
        ("q4 tc tiled 32 rows/warp, prefetch 2 ahead", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=128, GATED=False, PF2=True), 4, ()),
        ("q4 tc tiled 32 rows/warp, prefetch 1 ahead", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=128, GATED=False), 4, ()),
        ("q4 gate|up tc tiled 32 rows/warp halves, pf2", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=128, GATED=True, GHALF=True, PF2=True), 4, ()),
        ("q4 tc tiled 32 rows/warp pf2, producer preloaded", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=128, GATED=False, PF2=True, FOLD=2, FPRE=True), 4, ()),
        ("q4 gate|up 32 rows/warp pf2, rstd", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=128, GATED=True, GHALF=True, PF2=True, RSTD=True), 4, ()),
        ("q4 tc tiled wide, two groups before the wait", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, FOLD=2, FPRE=True), 4, ()),
        ("q4 gate|up tc tiled wide, two before the wait, rstd", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=True, GHALF=True, PW2=True, RSTD=True), 4, ()),
        ("q4 tc tiled wide, two before the wait, rstd, dense a|b rows", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, RSTD=True, DENSE=True, BKW=2048), 4, ()),
        ("q4 tc tiled wide, two before the wait, rstd", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, RSTD=True), 4, ()),
        # session 10: the in-projection with the q|k|v conv epilogue, the o projection with the heads' rstd
        ("q4 tc tiled wide, rstd, dense a|b rows, conv epilogue", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, RSTD=True, DENSE=True, BKW=2048, CONV=True, KC=4, KP=4), 4, ()),
        ("q4 tc tiled wide, producer, head rstd (NVB 12)", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, FOLD=2, FPRE=True, HEADNORM=1, NVB=12), 4, ("DV",)),
        ("q4 tc tiled wide, producer, head rstd loaded once (NVB 12)", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, FOLD=2, FPRE=True, HEADNORM=2, NVB=12), 4, ("DV",)),
        ("q4 gate|up tc tiled wide, folded-norm rstd", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 256, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False,
          "GPI": 1, "MMA": True, "PREFETCH": True, "TR": 64, "GHALF": True, "RSTD": True}, 4, ()),
        ("q4 gate|up+silu T=1 (128 weights/thr)", kq4._q4_gemv_kernel, q4_types,
         {"T": 1, "G": 128, "BN": 64, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False, "GPI": 1, "MMA": False, "PREFETCH": False}, 4, ()),
        ("q4 gate|up+silu T=4", kq4._q4_gemv_kernel, q4_types,
         {"T": 4, "G": 128, "BN": 32, "SPLIT_K": True, "GATED": True, "X_BF16": True, "ASM": True, "PAIRS": False, "GPI": 1, "MMA": False, "PREFETCH": False}, 4, ()),
        ("q4 T=8", kq4._q4_gemv_kernel, q4_types,
         {"T": 8, "G": 128, "BN": 32, "SPLIT_K": True, "GATED": False, "X_BF16": True, "ASM": True, "PAIRS": False, "GPI": 1, "MMA": False, "PREFETCH": False}, 4, ()),
        ("q8 T=1 (32 weights/thr)", kq8._q8_gemv_kernel, q8_types,
         {"T": 1, "BN": 64, "BW": 16, "SPLIT_K": False, "GATED": False, "X_BF16": True, "EVEN_K": True}, 4,
         ("KW", "WPS")),
        ("q8 g128 head (128 rows x 128 cols)", kq8._q8_gemv_grouped_kernel, q8_types,
         {"T": 1, "BN": 128, "BW": 32, "SPLIT_K": False, "GATED": False, "X_BF16": True, "EVEN_K": True, "GW": 32}, 4,
         ("KW", "WPS")),
        ("nf4 T=1 (64 rows x 16 words / iter), gathers", knf4._nf4_gemv_kernel, nf4_types,
         {"BN": 64, "BW": 16, "BSW": 8, "SPLIT_K": True, "X_BF16": True, "SPLITP": 16, "ASM": False}, 4, ("KW", "WPS")),
        ("nf4 T=1, register table lookup", knf4._nf4_gemv_kernel, nf4_types,
         {"BN": 64, "BW": 16, "BSW": 8, "SPLIT_K": True, "X_BF16": True, "SPLITP": 16, "ASM": True}, 4, ("KW", "WPS")),
        ("q8 gate|up+silu T=1", kq8._q8_gemv_kernel, q8_types,
         {"T": 1, "BN": 64, "BW": 16, "SPLIT_K": True, "GATED": True, "X_BF16": True, "EVEN_K": True}, 4,
         ("KW", "WPS")),
        ("gdn step dk=96 dv=192 BV=32", kgdn._gdn_decode_kernel, gdn_types,
         {"KC": 4, "KP": 4, "BK": 128, "BV": 32, "BDV": 256, "NEG": True, "FUSED_AB": False, "BU": 512,
          "stride_sv": 1}, 4, ("HK", "DK", "DV", "stride_sk")),
        ("gdn step + fused a|b (D=3840)", kgdn._gdn_decode_kernel, gdn_types,
         {"KC": 4, "KP": 4, "BK": 128, "BV": 32, "BDV": 256, "NEG": True, "FUSED_AB": True, "BU": 512,
          "stride_sv": 1}, 4, ("HK", "DK", "DV", "D", "stride_sk")),
        ("gdn step + fused a|b, BV=64 8 warps", kgdn._gdn_decode_kernel, gdn_types,
         {"KC": 4, "KP": 4, "BK": 128, "BV": 64, "BDV": 256, "NEG": True, "FUSED_AB": True, "BU": 512,
          "stride_sv": 1}, 8, ("HK", "DK", "DV", "D", "stride_sk")),
        ("gdn step + a|b rows before the wait", kgdn._gdn_decode_kernel, gdn_types,
         {"KC": 4, "KP": 4, "BK": 128, "BV": 64, "BDV": 256, "NEG": True, "FUSED_AB": True, "BU": 4096,
          "AB_ONCE": True, "stride_sv": 1}, 8, ("HK", "DK", "DV", "D", "stride_sk")),
        ("gdn step, a|b given, dk-major, BV=16 1 warp", kgdn._gdn_decode_kernel, gdn_types,
         {"KC": 4, "KP": 4, "BK": 128, "BV": 16, "BDV": 256, "NEG": True, "FUSED_AB": False, "BU": 512,
          "stride_sk": 1}, 1, ("HK", "DK", "DV", "stride_sv")),
        ("gdn step folded (act in, x~ out), dk-major, BV=16 1 warp", kgdn._gdn_decode_kernel,
         dict(gdn_types, qkv_ptr="*fp32"),
         {"KC": 4, "KP": 4, "BK": 128, "BV": 16, "BDV": 256, "NEG": True, "FUSED_AB": False, "BU": 512,
          "stride_sk": 1, "FOLDED": True}, 1, ("HK", "DK", "DV", "stride_sv")),
        ("attention bf16 hd=128 BS=64", katt._attn_decode_kernel, att_types,
         {"G": 1, "BD": 128, "BS": 64, "NS": 18, "NSP": 32, "QUANT": False}, 8, att_div),
        ("attention int8 hd=128 BS=64", katt._attn_decode_kernel, dict(att_types, k_ptr="*u8", v_ptr="*u8"),
         {"G": 1, "BD": 128, "BS": 64, "NS": 18, "NSP": 32, "QUANT": True}, 8, att_div),
        # session 11: the qkv projection's q/k sums of squares, attention with attention_prep's work inside
        ("q4 tc tiled wide, two before the wait, q/k row sums", kq4._q4_gemv_kernel, q4_types,
         dict(tcw, BN=256, GATED=False, PW2=True, RSUM=True), 4, ()),
        ("attention bf16 hd=128 BS=32 2 warps, prep inside", katt._attn_decode_kernel, att_types,
         {"G": 1, "BD": 128, "BS": 32, "NS": 18, "NSP": 32, "QUANT": False, "PREP": True, "NSSP": 64, "KV_PRE": True}, 2,
         att_div + ("NQ", "NK")),
        ("attention int8 hd=128 BS=32 2 warps, prep inside", katt._attn_decode_kernel,
         dict(att_types, k_ptr="*u8", v_ptr="*u8", kcw_ptr="*i8", vcw_ptr="*i8"),
         {"G": 1, "BD": 128, "BS": 32, "NS": 18, "NSP": 32, "QUANT": True, "PREP": True, "NSSP": 64, "KV_PRE": True}, 2,
         att_div + ("NQ", "NK")),
        ("attention bf16 BS=32 8 warps (long context)", katt._attn_decode_kernel, att_types,
         {"G": 1, "BD": 128, "BS": 32, "NS": 36, "NSP": 64, "QUANT": False}, 8, att_div),
        ("attention bf16 BS=32 8 warps, prep inside", katt._attn_decode_kernel, att_types,
         {"G": 1, "BD": 128, "BS": 32, "NS": 36, "NSP": 64, "QUANT": False, "PREP": True, "NSSP": 64, "KV_PRE": True},
         8, att_div + ("NQ", "NK")),
        ("attention int8 BS=32 8 warps (long context)", katt._attn_decode_kernel,
         dict(att_types, k_ptr="*u8", v_ptr="*u8"),
         {"G": 1, "BD": 128, "BS": 32, "NS": 36, "NSP": 64, "QUANT": True}, 8, att_div),
        ("attention int8 BS=32 8 warps, prep inside", katt._attn_decode_kernel,
         dict(att_types, k_ptr="*u8", v_ptr="*u8", kcw_ptr="*i8", vcw_ptr="*i8"),
         {"G": 1, "BD": 128, "BS": 32, "NS": 36, "NSP": 64, "QUANT": True, "PREP": True, "NSSP": 64, "KV_PRE": True},
         8, att_div + ("NQ", "NK")),
        ("attention prep (q/k norm + int8 KV write)", katt._attn_prep_kernel, prep_types,
         {"G": 1, "BQ": 4096, "BK": 4096, "BD": 128, "QUANT": True}, 4, ("NQ", "NK", "HD")),
        ("attention prep (bf16 KV write)", katt._attn_prep_kernel, dict(prep_types, kc_ptr="*bf16", vc_ptr="*bf16"),
         {"G": 1, "BQ": 4096, "BK": 4096, "BD": 128, "QUANT": False}, 4, ("NQ", "NK", "HD")),
        ("gdn recurrent prefill dk=96 dv=192 BV=16", kgr._gdn_recurrent_kernel, rec_types,
         {"BK": 128, "BV": 16, "HAS_STATE": True, "stride_sv": 1, "n_ptr": None, "HAS_N": False}, 1,
         ("DK", "DV", "stride_sk")),
        ("gdn recurrent prefill, a dk-major state", kgr._gdn_recurrent_kernel, rec_types,
         {"BK": 128, "BV": 16, "HAS_STATE": True, "stride_sk": 1, "n_ptr": None, "HAS_N": False}, 1,
         ("DK", "DV", "stride_sv")),
        ("gdn recurrent prefill, padded (n on the device)", kgr._gdn_recurrent_kernel,
         dict(rec_types, n_ptr="*i64"), {"BK": 128, "BV": 16, "HAS_STATE": True, "stride_sk": 1, "HAS_N": True}, 1,
         ("DK", "DV", "stride_sv")),
        ("prefill attention over the cache, bf16", kac._attn_cached_kernel, ac_types,
         {"G": 1, "BD": 128, "BM": 64, "BN": 64, "QUANT": False, "IEEE": False}, 4, ac_div),
        ("prefill attention over the cache, int8", kac._attn_cached_kernel,
         dict(ac_types, k_ptr="*i8", v_ptr="*i8", ks_ptr="*fp32", vs_ptr="*fp32"),
         {"G": 1, "BD": 128, "BM": 64, "BN": 64, "QUANT": True, "IEEE": False}, 4, ac_div),
        ("q8 embedding + the first norm folded", importlib.import_module("olmo_local.kernels.embed")._q8_embed_kernel,
         {"ids_ptr": "*i64", "qw_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*bf16", "D": "i32", "NG": "i32",
          "GS": "i32", "nw_ptr": "*bf16", "xt_ptr": "*bf16", "ss_ptr": "*fp32"},
         {"BD": 4096, "GROUPS": True, "FOLD": True}, 4, ("D",)),
        ("add_rmsnorm d=3840", knorm._rmsnorm_kernel, norm_types, {"BD": 4096, "MODE": 1}, 8,
         ("D", "stride_x", "stride_r", "stride_y", "stride_ro")),
        ("rmsnorm_add + rmsnorm d=3840", knorm._rmsnorm_kernel, norm_types, {"BD": 4096, "MODE": 4}, 8,
         ("D", "stride_x", "stride_r", "stride_y", "stride_ro")),
    ]
    if ARGS.arch < 90:  # below sm_90 the launch gives the wide programs 32 rows per warp (gemv_q4._wide_launch)
        jobs += [(f"{name} [32 rows/warp, as launched below sm_90]", fn, types, dict(consts, BN=consts["BN"] // 2),
                  nw, div)
                 for name, fn, types, consts, nw, div in list(jobs)
                 if " wide" in name and consts.get("MMA") and consts.get("BN") == 256 and nw == 4]
    if ARGS.only:
        jobs = [j for j in jobs if ARGS.only in j[0]]
    # shared memory one block may use (opt-in maximum): sm_80 163 KB, sm_86 / sm_89 99 KB, sm_90 227 KB
    smem_max = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}.get(ARGS.arch, 101376)
    print(f"triton {triton.__version__}: sm_{ARGS.arch} builds (at most {smem_max} bytes of shared memory per block)")
    n_fail = 0
    for name, fn, types, consts, nw, div in jobs:
        try:
            head, loops, shared = sass_summary(build(fn, types, consts, nw, div))
            if shared > smem_max:
                raise RuntimeError(f"{head}: needs {shared} bytes of shared memory, sm_{ARGS.arch} has {smem_max}")
            spill = " SPILLS" if " stack 0 " not in head + " " else ""
            print(f"[{'PASS' if not spill else 'WARN'}] {name:<40} {head}{spill}")
            for lp in loops[:2]:
                print(f"       {lp}")
        except Exception as exc:  # noqa: BLE001  (report every kernel)
            n_fail += 1
            print(f"[FAIL] {name:<40} {type(exc).__name__}: {str(exc)[:3000]}")
    print(f"{len(jobs) - n_fail} PASS, {n_fail} FAIL")
    return 1 if n_fail else 0


def main():
    if ARGS.aot:
        return aot_report()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if CUDA else 'cpu (interpreter)'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton missing: nothing to check")
        return 1
    bw = copy_bandwidth()
    if CUDA:
        print(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    t_start = time.time()
    only = ARGS.only.lower()
    for name, fn in plan():
        if only and only not in name.lower():
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (report and go on with the next check)
            fail(name, exc)
        if CUDA:
            torch.cuda.empty_cache()
    elapsed = time.time() - t_start

    print()
    print(f"{'check':<30}{'result':<7}{'max err':>10}{'graph us':>11}{'eager us':>11}{'MB':>9}{'GB/s':>9}{'%copy':>7}")
    for r in RESULTS:
        err = max(r["errs"].values(), default=float("nan"))
        pct = 100 * r["gbs"] / bw if not (math.isnan(bw) or math.isnan(r["gbs"])) else float("nan")
        print(f"{r['name']:<30}{'PASS' if r['ok'] else 'FAIL':<7}{err:>10.2e}{r['us']:>11.2f}{r['eager_us']:>11.2f}"
              f"{r['bytes'] / 1e6:>9.2f}{r['gbs']:>9.1f}{pct:>7.1f}  {r['note']}")
    per_token_estimate()
    n_fail = sum(not r["ok"] for r in RESULTS)
    print(f"{len(RESULTS) - n_fail} PASS, {n_fail} FAIL in {elapsed:.0f} s")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if CUDA else "cpu", "copy_gbs": bw}
        (Path(out_dir) / "gpu_check_kernels.json").write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=1))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
