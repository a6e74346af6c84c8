"""Random Olmo Hybrid checkpoints of any preset (``olmo-local init-random``), written tensor by tensor
so even the 7B shape never needs more host RAM than one shard."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from olmo_local.checkpoint import AtomicDir, linear_shapes, plain_shapes, write_safetensors
from olmo_local.config import OlmoHybridConfig

DOLMA2_DIR = Path(__file__).parent / "assets" / "dolma2"


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """Values in the ranges a trained model has (norm weights near 1, A_log/dt_bias like the init)."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith("dt_bias"):
        dt = torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    if "conv1d" in name:
        return torch.empty(shape).uniform_(-0.5, 0.5, generator=gen)
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * std


def random_tensors(cfg: OlmoHybridConfig, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = dict(plain_shapes(cfg))
    shapes.update({p + ".weight": s for p, s in linear_shapes(cfg).items()})
    for name in sorted(shapes, key=_order):
        t = random_tensor(name, shapes[name], gen)
        yield name, t if name.endswith(("A_log", "dt_bias")) else t.to(dtype)


def _order(name: str) -> tuple:
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1
    return (layer, name)


def write_random_checkpoint(dst: str | Path, cfg: OlmoHybridConfig, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, force: bool = False,
                            max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write config.json, safetensors and (when the vocabulary fits) the Dolma-2 tokenizer."""
    with AtomicDir(dst, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, indent=2))
        _write_streaming(tmp, random_tensors(cfg, seed, dtype), max_shard_bytes)
        if cfg.vocab_size >= 100278 and (DOLMA2_DIR / "tokenizer.json").is_file():
            for f in DOLMA2_DIR.iterdir():
                if f.suffix in (".json", ".jinja"):
                    shutil.copy(f, tmp / f.name)
    return Path(dst)


def _write_streaming(dst: Path, items: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Like write_safetensors but never holds more than one shard in memory."""
    from safetensors.torch import save_file

    shards: list[str] = []
    weight_map: dict[str, str] = {}
    cur: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal cur, size
        fname = f"shard-{len(shards):05d}.safetensors"
        save_file(cur, str(dst / fname), metadata={"format": "pt"})
        shards.append(fname)
        weight_map.update({k: fname for k in cur})
        cur, size = {}, 0

    for name, t in items:
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes:
            flush()
        cur[name] = t.contiguous()
        size += nb
        total += nb
    if not shards:  # everything fits one file
        write_safetensors(dst, cur, max_shard_bytes=max(max_shard_bytes, size + 1))
        return
    flush()
    n = len(shards)
    final = {}
    for i, old in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (dst / old).rename(dst / new)
        final[old] = new
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=2))
