"""``olmo-local bench``: llama-bench-style speed and memory figures with a decode roofline.

Thin command over ``run_bench``; the pieces live beside it: bench_run (tests and engines),
bench_roofline (bytes per token, copy bandwidth), bench_synth (random models on the device),
bench_hf (transformers comparison), bench_report (environment line, md/json/csv).
Only the table goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Optional

import typer

from olmo_local.cli import app
from olmo_local.errors import OlmoError

OUTPUTS = ("md", "json", "csv")
GPU_DEPTHS = [4096, 32768]


def parse_depths(text: str | None, device_type: str) -> list[int]:
    """'4096,32768' -> [4096, 32768]; '' / 'none' / '0' -> []; None -> the device default
    (4096 and 32768 on GPU, none on CPU)."""
    if text is None:
        return list(GPU_DEPTHS) if device_type == "cuda" else []
    text = text.strip().lower()
    if text in ("", "none", "0"):
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            val = int(part[:-1]) * 1024 if part.endswith("k") else int(part)  # "32k" = 32768
        except ValueError:
            raise OlmoError(f"--depth takes comma-separated token counts like 4096,32768 (got {text!r})") from None
        if val < 0:
            raise OlmoError(f"--depth must be >= 0 (got {val})")
        if val:
            out.append(val)
    return out


class Progress:
    """A rich status line on a terminal, plain lines on stderr otherwise (or nothing when quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal and not quiet
        self._status = None

    def __enter__(self) -> Progress:
        if self.live:
            self._status = self.console.status("bench: starting")
            self._status.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.stop()

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self._status is not None:
            self._status.update(f"bench: {msg}")
        else:
            print(f"bench: {msg}", file=sys.stderr, flush=True)


def _dtype_name(dtype) -> str:
    import torch
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8"}.get(
        dtype, str(dtype).replace("torch.", ""))


def detect_format(model) -> str:
    """The storage format of the big linears of a loaded model (q4, q8, nf4, or the dense dtype)."""
    from olmo_local.model import GDNLayer

    names = set()
    for layer in model.layers:
        mods = [layer.qkvz, layer.o] if isinstance(layer, GDNLayer) else [layer.qkv, layer.o]
        for m in mods + [layer.mlp.gate_up, layer.mlp.down]:
            t = type(m).__name__
            names.add({"Q4Linear": "q4", "Q8Linear": "q8", "NF4Linear": "nf4"}.get(
                t, _dtype_name(getattr(m, "weight", None).dtype) if hasattr(m, "weight") else t))
    return "+".join(sorted(names))


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_bench(model: str | None = None, synthetic: str | None = None, fmt: str | None = None,
              device: str | None = None, reps: int = 5, n_prompt: int = 512, n_gen: int = 128,
              depth: str | None = None, compare: str | None = None, ctx: int | None = None, seed: int = 0,
              kv_cache: str = "bf16", graph: bool | None = None, bw_bytes: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build or load the model, run the tests (and the comparison), return the result dict that
    bench_report renders."""
    import torch

    from olmo_local import bench_roofline as roof
    from olmo_local.bench_report import environment
    from olmo_local.bench_run import BenchSpec, OursEngine, run_tests
    from olmo_local.runtime import Runtime, make_generator, pick_device
    from olmo_local.state import DecodeState

    say = progress or (lambda msg: None)
    if (model is None) == (synthetic is None):
        raise OlmoError("give either a MODEL or --synthetic 7b|1b|tiny (not both)")
    if reps < 1:
        raise OlmoError("-r must be at least 1")
    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise OlmoError("-p and -n must be >= 0, and not both 0")
    if compare is not None:
        from olmo_local.bench_hf import require
        require(compare)  # fail before any work when transformers (or bitsandbytes) is missing
    dev = pick_device(device)
    spec = BenchSpec(n_prompt=n_prompt, n_gen=n_gen, depths=parse_depths(depth, dev.type), reps=reps, seed=seed)
    need = spec.ctx_needed()
    if ctx is not None and ctx < need:
        raise OlmoError(f"--ctx {ctx} is too small for these tests (they need {need} tokens)")
    ctx = ctx or need

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time_now()
    try:
        if synthetic is not None:
            from olmo_local.bench_synth import build_synthetic, check_format
            from olmo_local.config import PRESETS, preset

            if synthetic not in PRESETS:
                raise OlmoError(f"unknown --synthetic {synthetic!r} (choose from {', '.join(PRESETS)})")
            fmt = fmt or "bf16"
            check_format(fmt)
            base = PRESETS[synthetic].get("max_position_embeddings", 65536)
            cfg = preset(synthetic, max_position_embeddings=max(base, ctx))
            net = build_synthetic(cfg, dev, fmt, torch.bfloat16, seed=seed,
                                  progress=lambda i, n: say(f"building synthetic {synthetic} {fmt}: layer {i}/{n}"))
            name, path = f"olmo-hybrid {synthetic} (synthetic)", None
        else:
            from olmo_local.checkpoint import load_model, read_config, resolve_model

            path = resolve_model(model)
            cfg = read_config(path)
            if ctx > cfg.max_position_embeddings:
                raise OlmoError(f"these tests need a {ctx}-token context, more than the model's "
                                f"max_position_embeddings ({cfg.max_position_embeddings}); lower --depth/-p/-n")
            net = load_model(path, dev, torch.bfloat16 if fmt == "bf16" else None,  # else the chat's default
                             progress=lambda i, n: say(f"loading {path.name}: layer {i}/{n}"))
            name = path.name if path.name else str(model)
            detected = detect_format(net)
            if fmt is not None and fmt != detected:
                raise OlmoError(f"{model} runs as {detected}; --format picks the format of --synthetic models "
                                f"(and bf16 for a dense checkpoint): make a {fmt} checkpoint with olmo-local quantize")
            fmt = detected
        state = DecodeState(cfg, ctx, dev, net.dtype, kv_cache=kv_cache)
        gen = make_generator(net, state, graph=graph)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except torch.cuda.OutOfMemoryError:
        raise OlmoError("out of GPU memory building the model (try a 4-bit --format or a smaller --depth)") \
            from None
    load_s = time_now() - t0
    rt = Runtime(path, cfg, net, None, state, gen, dev, load_s)
    weights_dev = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    wbytes = roof.model_weight_bytes(net)
    kv_dtype, model_dtype = state.k_cache.dtype, net.dtype

    rows = run_tests(OursEngine(rt), spec, cfg.vocab_size, say)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    peak_dev = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    peak_rss = _peak_rss()
    say("measuring the device copy bandwidth")
    bw_buf = bw_bytes or (2**30 if dev.type == "cuda" else 256 * 2**20)
    bw = roof.measure_copy_bandwidth(dev, bw_buf)

    def roofline(m, weight_bytes) -> tuple[int | None, float | None]:
        if m.kind != "tg":
            return None, None
        b = roof.decode_bytes_per_token(cfg, weight_bytes, m.mean_depth, kv_dtype, model_dtype)
        return b, bw / b

    out_rows = []
    for m in rows:
        b, ceil = roofline(m, wbytes)
        out_rows.append(dict(test=m.test, kind=m.kind, n_prompt=m.n_prompt, n_gen=m.n_gen, depth=m.depth,
                             unit=m.unit, mean=m.mean, stddev=m.stddev, samples=m.samples, bytes_per_token=b,
                             roofline_tps=ceil, roofline_pct=None if ceil is None else 100 * m.mean / ceil,
                             hf_mean=None, hf_stddev=None, hf_samples=None, hf_roofline_pct=None,
                             speed_ratio=None))
    memory = dict(peak_device_bytes=peak_dev, weights_device_bytes=weights_dev, peak_rss_bytes=peak_rss,
                  state_bytes=roof.state_bytes(cfg, model_dtype),
                  kv_bytes_per_token=roof.kv_bytes_per_token(cfg, kv_dtype),
                  hf_peak_device_bytes=None, hf_load_s=None)

    if compare is not None:
        del net, state, gen  # _run_compare frees ours (through rt) once transformers' model is built
        _run_compare(compare, rt, spec, out_rows, memory, bw, say)

    return dict(
        env=environment(dev, compare),
        model=dict(name=name, synthetic=synthetic, format=fmt, device=str(dev), dtype=_dtype_name(model_dtype),
                   kv_dtype=_dtype_name(kv_dtype), params=cfg.num_params(), size_bytes=sum(wbytes.values()),
                   load_s=load_s),
        memory=memory,
        roofline=dict(bandwidth_bytes_per_s=bw, bandwidth_buffer_bytes=bw_buf, weight_bytes=wbytes,
                      bytes_per_token_d0=roof.decode_bytes_per_token(cfg, wbytes, 0, kv_dtype, model_dtype)),
        rows=out_rows,
    )


def time_now() -> float:
    import time
    return time.perf_counter()


def _run_compare(kind: str, rt, spec, out_rows: list[dict], memory: dict, bw: float, say) -> None:
    """Same tests, same token ids, through transformers; fills the hf_* fields and the speed ratio."""
    import gc

    import torch

    from olmo_local import bench_roofline as roof
    from olmo_local.bench_hf import HFEngine, build_hf
    from olmo_local.bench_run import run_tests

    dev, cfg = rt.device, rt.config
    say(f"building transformers' model ({kind})")
    t0 = time_now()
    hf = build_hf(rt.model, kind, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    memory["hf_load_s"] = time_now() - t0
    prefill_chunk = rt.generator.prefill_chunk
    rt.model = rt.state = rt.generator = None  # ours is done: free its weights and state
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    emb = hf.get_input_embeddings().weight
    all_bytes = sum(t.numel() * t.element_size() for t in list(hf.parameters()) + list(hf.buffers()))
    emb_bytes = emb.numel() * emb.element_size()
    hf_weights = {"linear": all_bytes - emb_bytes, "embedding": emb_bytes}  # same arithmetic as ours
    engine = HFEngine(hf, kind, dev, prefill_chunk=prefill_chunk)
    try:
        rows = run_tests(engine, spec, cfg.vocab_size, say)
    except torch.cuda.OutOfMemoryError:
        raise OlmoError(f"--compare {kind}: out of GPU memory in transformers (lower --depth)") from None
    except Exception as e:  # noqa: BLE001 - a failure inside transformers/bitsandbytes, not ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OlmoError(f"--compare {kind}: transformers failed on this model/device: "
                        f"{type(e).__name__}: {first[:200]}") from None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        memory["hf_peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
    by_test = {m.test: m for m in rows}
    for r in out_rows:
        m = by_test.get(r["test"])
        if m is None:
            continue
        r["hf_mean"], r["hf_stddev"], r["hf_samples"] = m.mean, m.stddev, m.samples
        if m.kind == "tg":
            b = roof.decode_bytes_per_token(cfg, hf_weights, m.mean_depth, torch.bfloat16)  # its KV: bf16
            r["hf_roofline_pct"] = 100 * m.mean / (bw / b)
        if m.mean > 0 and r["mean"] > 0:
            r["speed_ratio"] = m.mean / r["mean"] if m.kind == "ttft" else r["mean"] / m.mean
    del engine, hf
    gc.collect()


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="model directory or Hugging Face repo id (or use --synthetic)"),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="random weights of a preset shape built on "
                                            "the device: 7b, 1b or tiny (no disk, no download)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="bf16, q8, q4 or nf4 (--synthetic; default bf16)"),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda if available)"),
    reps: int = typer.Option(5, "-r", "--repetitions", help="timed runs per test (after one warm-up run)"),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="prompt tokens for pp and ttft (0 = skip)"),
    n_gen: int = typer.Option(128, "-n", "--n-gen", help="generated tokens for tg (0 = skip)"),
    depth: Optional[str] = typer.Option(None, "-d", "--depth", help="tg at these context depths, e.g. "
                                        "4096,32768 (default: those on GPU, none on CPU; 'none' = skip)"),
    output: str = typer.Option("md", "-o", "--output", help="md, json or csv"),
    compare: Optional[str] = typer.Option(None, "--compare", help="also run transformers on the same weights: "
                                          "hf (bf16) or hf-nf4 (bitsandbytes 4-bit)"),
    ctx: Optional[int] = typer.Option(None, help="context size of the decode state (default: what the tests need)"),
    seed: int = typer.Option(0, help="seed of the random weights and token ids"),
    kv_cache: str = typer.Option("bf16", "--kv-cache", help="bf16 (the model dtype) or int8"),
    graph: Optional[bool] = typer.Option(None, "--graph/--no-graph", help="CUDA-graph decode step (default: on "
                                         "on CUDA, as in the chat)"),
    bw_mib: Optional[int] = typer.Option(None, "--bw-mib", hidden=True, help="copy-bandwidth buffer in MiB"),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads for torch (default: torch's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
) -> None:
    """Speed and memory: pp512, tg128, tg128 at depth, ttft; peak memory; % of the decode roofline."""
    from olmo_local.bench_report import RENDERERS

    if output not in OUTPUTS:
        raise OlmoError(f"unknown -o {output!r} (use md, json or csv)")
    if threads is not None:
        if threads < 1:
            raise OlmoError("-t must be at least 1")
        import torch
        torch.set_num_threads(threads)
    with Progress(quiet) as progress:
        res = run_bench(model=model, synthetic=synthetic, fmt=fmt, device=device, reps=reps, n_prompt=n_prompt,
                        n_gen=n_gen, depth=depth, compare=compare, ctx=ctx, seed=seed, kv_cache=kv_cache,
                        graph=graph, bw_bytes=bw_mib * 2**20 if bw_mib else None, progress=progress)
    sys.stdout.write(RENDERERS[output](res))
    sys.stdout.flush()
