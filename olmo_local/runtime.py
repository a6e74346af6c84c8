"""Open a model for use: resolve the name, pick the device, load weights and tokenizer, size the state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from olmo_local.checkpoint import load_model, read_config, resolve_model
from olmo_local.config import OlmoHybridConfig
from olmo_local.errors import OlmoError
from olmo_local.generate import Generator
from olmo_local.state import DecodeState

DEFAULT_CPU_CTX = 4096
DEFAULT_GPU_CTX = 8192

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(device: str | None) -> torch.device:
    """CUDA when available, else CPU; ``--device cuda`` without a GPU is a clear error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise OlmoError(f"unknown device {device!r} (use cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OlmoError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise OlmoError(f"unknown dtype {name!r} (use {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass
class Runtime:
    path: Path
    config: OlmoHybridConfig
    model: torch.nn.Module
    tokenizer: object  # olmo_local.tokenizer.Tokenizer
    state: DecodeState
    generator: Generator
    device: torch.device
    load_s: float
    plan: object = None  # olmo_local.planner.Plan

    @property
    def n_valid(self) -> int:
        return min(self.tokenizer.vocab_size, self.config.vocab_size)


def loaded_weight_bytes(path: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the weights take once loaded in ``dtype``, bytes of the largest linear dequantized)."""
    import math

    from olmo_local.checkpoint import TensorReader
    reader = TensorReader(path)
    esize = torch.tensor([], dtype=dtype).element_size()
    total = largest = 0
    for name in reader.names():
        shape = reader.shape(name)
        n = math.prod(shape)
        dt = reader.dtype(name)
        if dt is not None and dt.is_floating_point and not name.endswith(("A_log", "dt_bias", "absmax",
                                                                           "quant_map", ".scales", ".mins")):
            total += n * esize
        else:
            total += n * (torch.tensor([], dtype=dt or torch.uint8).element_size())
        if len(shape) == 2 and "embed" not in name:
            k = shape[1] * (2 if dt == torch.uint8 and name.endswith("qweight") else 1)
            largest = max(largest, shape[0] * k)
    return total, largest


KV_CACHE_CHOICES = ("auto", "bf16", "int8")


def resolve_kv_cache(kind: str, device: torch.device) -> str:
    """``auto`` -> int8 on CUDA (on the demo model its greedy agreement with the fp32 reference is as
    high as the bf16 cache's: 98.05 vs 97.66 % over 256 steps, docs/benchmarks.md; half the bytes), the
    model dtype ("bf16") elsewhere."""
    if kind not in KV_CACHE_CHOICES:
        raise OlmoError(f"unknown --kv-cache {kind!r} (use auto, bf16 or int8)")
    if kind == "auto":
        return "int8" if device.type == "cuda" else "bf16"
    return kind


def open_model(name: str, device: str | None = None, ctx: int | None = None, dtype: str | None = None,
               kv_cache: str = "auto", progress: Callable[[int, int], None] | None = None,
               graph: bool | None = None) -> Runtime:
    """Load a model ready to generate. On CUDA the memory planner sizes the context before anything is
    allocated, and decoding runs through the CUDA-graph step."""
    from olmo_local.checkpoint import default_dtype
    from olmo_local.planner import free_device_memory, plan
    from olmo_local.tokenizer import Tokenizer

    t0 = time.perf_counter()
    path = resolve_model(name)
    cfg = read_config(path)
    dev = pick_device(device)
    kv_cache = resolve_kv_cache(kv_cache, dev)
    tok = Tokenizer.from_dir(path)
    if ctx is not None and ctx > cfg.max_position_embeddings:
        raise OlmoError(f"--ctx {ctx} is larger than the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    if dev.type == "cpu":
        set_cpu_threads(cfg)
    dt = parse_dtype(dtype) or default_dtype(cfg, dev)
    wbytes, largest = loaded_weight_bytes(path, dt)
    if ctx is None and dev.type == "cpu":
        ctx = min(cfg.max_position_embeddings, DEFAULT_CPU_CTX)
    mem_plan = plan(cfg, wbytes, free_device_memory(dev), ctx, kv_cache, largest_linear=largest,
                    device_type=dev.type)
    chunk = mem_plan.prefill_chunk
    model = load_model(path, dev, dt, progress=progress)
    try:
        state = DecodeState(cfg, mem_plan.ctx, dev, model.dtype, kv_cache=kv_cache)
    except torch.cuda.OutOfMemoryError:
        raise OlmoError(f"not enough GPU memory for a {mem_plan.ctx}-token context (lower --ctx)") from None
    gen = make_generator(model, state, chunk, graph)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    rt = Runtime(path, cfg, model, tok, state, gen, dev, time.perf_counter() - t0)
    rt.plan = mem_plan
    return rt


def set_cpu_threads(cfg: OlmoHybridConfig) -> None:
    """Small models run on one CPU thread: their matmuls are too small to split, and on a busy machine
    the threads' hand-offs cost 100x the work (measured: a 21-token demo prefill took 1.3 s on 2 threads
    with another process running, 15 ms on 1). OLMO_LOCAL_THREADS overrides."""
    import os

    env = os.environ.get("OLMO_LOCAL_THREADS")
    if env:
        torch.set_num_threads(max(1, int(env)))
    elif cfg.num_params() < 200_000_000:
        torch.set_num_threads(1)


def make_generator(model: torch.nn.Module, state: DecodeState, prefill_chunk: int | None = None,
                   graph: bool | None = None) -> Generator:
    """The one place a Generator (and so its per-token step) is built: chat, generate and bench all get
    theirs here. On CUDA the step is the static decode step captured as a CUDA graph (set
    OLMO_LOCAL_GRAPH=0 to run it eagerly) and prompts of up to 512 tokens prefill through padded
    CUDA graphs (olmo_local.prefill_graph; OLMO_LOCAL_PREFILL_GRAPH=0 keeps them eager); on CPU the
    model's eager forward."""
    import os

    if prefill_chunk is None:
        from olmo_local.planner import prefill_chunk_for

        prefill_chunk = prefill_chunk_for(state.max_ctx, state.device.type)
    gen = Generator(model, state, prefill_chunk=prefill_chunk)
    if state.device.type == "cuda":
        from olmo_local.decode import DecodeStep
        from olmo_local.prefill_graph import PrefillGraphs
        if graph is None:
            graph = os.environ.get("OLMO_LOCAL_GRAPH", "1") != "0"
        gen.step_fn = DecodeStep(model, state, use_graph=graph)
        if graph and os.environ.get("OLMO_LOCAL_PREFILL_GRAPH", "1") != "0":
            gen.prefill_graphs = PrefillGraphs(model, state)
    return gen
