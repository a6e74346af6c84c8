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

    @property
    def n_valid(self) -> int:
        return min(self.tokenizer.vocab_size, self.config.vocab_size)


def make_generator(model: torch.nn.Module, state: DecodeState) -> Generator:
    """The one place a Generator (and so its per-token step) is built: chat, generate and bench all get
    theirs here, so a faster step (``Generator.step_fn``, e.g. a CUDA graph) plugged in here is what
    ``olmo-local bench`` measures."""
    return Generator(model, state, prefill_chunk=2048 if state.device.type == "cuda" else 512)


def open_model(name: str, device: str | None = None, ctx: int | None = None, dtype: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> Runtime:
    from olmo_local.tokenizer import Tokenizer

    t0 = time.perf_counter()
    path = resolve_model(name)
    cfg = read_config(path)
    dev = pick_device(device)
    tok = Tokenizer.from_dir(path)
    model = load_model(path, dev, parse_dtype(dtype), progress=progress)
    if ctx is None:
        ctx = min(cfg.max_position_embeddings, DEFAULT_GPU_CTX if dev.type == "cuda" else DEFAULT_CPU_CTX)
    if ctx > cfg.max_position_embeddings:
        raise OlmoError(f"--ctx {ctx} is larger than the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    try:
        state = DecodeState(cfg, ctx, dev, model.dtype)
    except torch.cuda.OutOfMemoryError:
        raise OlmoError(f"not enough GPU memory for a {ctx}-token context (lower --ctx)") from None
    gen = make_generator(model, state)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return Runtime(path, cfg, model, tok, state, gen, dev, time.perf_counter() - t0)
