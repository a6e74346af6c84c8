"""Memory planner: weights + KV per token + fixed state + workspace against the device's free memory.

Run before anything big is allocated: it picks the largest context that fits (or checks ``--ctx``) and
refuses with a clear message instead of running out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_local.config import OlmoHybridConfig
from olmo_local.errors import OlmoError

GIB = 2**30


def kv_bytes_per_token(cfg: OlmoHybridConfig, kv_cache: str = "bf16") -> int:
    """K and V of every attention layer for one position (int8 adds one fp32 scale per head)."""
    per_head = cfg.head_dim * 2 if kv_cache == "bf16" else cfg.head_dim + 4
    return 2 * len(cfg.attn_layers) * cfg.num_key_value_heads * per_head


def state_bytes(cfg: OlmoHybridConfig, esize: int = 2) -> int:
    """Conv state (model dtype) + fp32 recurrent state of all GDN layers."""
    nG = len(cfg.gdn_layers)
    conv = nG * cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * esize
    rec = nG * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return conv + rec


def prefill_chunk_for(ctx: int, device_type: str = "cuda") -> int:
    """Prompt tokens per prefill pass. A pass's temporaries (activations, GDN chunk matrices, the
    block-wise attention over the cache) come on top of weights + state + KV at the peak, so long
    contexts use shorter passes: on CUDA 2048 up to an 8K context, 1024 up to 16K, 512 beyond (filling
    a 7B q4 state to depth 32768 with int8 KV peaked 0.82 / 0.46 / 0.34 GiB above weights + state with
    passes of 2048 / 1024 / 512 on an H100, at 3.8K (cold) / 10.6K / 6.3K tokens/s); 512 on CPU."""
    if device_type != "cuda":
        return 512
    return 2048 if ctx <= 8192 else 1024 if ctx <= 16384 else 512


def workspace_bytes(cfg: OlmoHybridConfig, prefill_chunk: int, largest_linear: int, esize: int = 2) -> int:
    """Prefill activations of one chunk, one dequantized layer, the logits, the GDN chunk temporaries."""
    T, d = prefill_chunk, cfg.hidden_size
    acts = T * (4 * d + 3 * cfg.intermediate_size + 2 * (cfg.conv_dim + cfg.value_dim)) * esize
    gdn = 6 * cfg.linear_num_value_heads * T * 64 * 4 + 4 * T * cfg.value_dim * 4  # chunk matrices, fp32
    attn = cfg.num_attention_heads * T * T * 4 if T <= 4096 else 0  # SDPA math path scores
    logits = cfg.vocab_size * 4 * 4
    return acts + gdn + attn + logits + largest_linear * esize


def prefill_graph_bytes(cfg: OlmoHybridConfig) -> int:
    """The memory pool of the prefill graphs (olmo_local.prefill_graph): the temporaries of one pass of the
    largest bucket, held for the session (a continuing prompt's eager pass comes on top)."""
    from olmo_local.prefill_graph import BUCKETS

    return workspace_bytes(cfg, max(BUCKETS), 0)


@dataclass
class Plan:
    weights: int
    state: int
    snapshots: int
    workspace: int
    kv_per_token: int
    ctx: int
    free: int
    kv_cache: str
    prefill_chunk: int = 2048
    graphs: int = 0  # the prefill graphs' memory pool (CUDA)

    @property
    def total(self) -> int:
        return (self.weights + self.state + self.snapshots + self.workspace + self.graphs
                + self.kv_per_token * self.ctx)

    def lines(self) -> list[tuple[str, str]]:
        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
        return [("weights", g(self.weights)), ("recurrent + conv state", g(self.state)),
                ("state snapshots", g(self.snapshots)), ("workspace", g(self.workspace)),
                *([("prefill graphs", g(self.graphs))] if self.graphs else []),
                (f"KV cache ({self.kv_cache})", f"{g(self.kv_per_token * self.ctx)} for {self.ctx} tokens "
                                                f"({self.kv_per_token:,} B/token)"),
                ("total", g(self.total)), ("free on device", g(self.free)),
                ("prefill pass", f"{self.prefill_chunk} tokens")]


def plan(cfg: OlmoHybridConfig, weight_bytes: int, free_bytes: int, ctx: int | None = None,
         kv_cache: str = "bf16", prefill_chunk: int | None = None, largest_linear: int = 0, snapshots: int = 2,
         margin: float = 0.05, device_type: str = "cuda") -> Plan:
    """Choose the context: ``ctx`` if given (error if it does not fit), else the largest that fits,
    capped at the model's max_position_embeddings, in multiples of 256. ``prefill_chunk`` None: the
    policy of prefill_chunk_for on ``device_type`` (its workspace counted for the chosen context)."""
    st = state_bytes(cfg)
    kv = kv_bytes_per_token(cfg, kv_cache)
    usable = int(free_bytes * (1 - margin)) - 256 * 2**20
    gp = prefill_graph_bytes(cfg) if device_type == "cuda" else 0

    def fits_with(chunk: int) -> tuple[int, int]:
        ws = workspace_bytes(cfg, chunk, largest_linear)
        room = usable - weight_bytes - st * (1 + snapshots) - ws - gp
        return (room // kv if room > 0 else 0), ws

    chunk = prefill_chunk or prefill_chunk_for(ctx if ctx is not None else 1 << 30, device_type)
    fits, ws = fits_with(chunk)
    if ctx is None:
        ctx = min(cfg.max_position_embeddings, fits // 256 * 256)
        if ctx < 256:
            need = weight_bytes + st * (1 + snapshots) + ws + gp + 256 * kv
            raise OlmoError(f"the model needs about {need / GIB:.1f} GiB on the device but only "
                            f"{free_bytes / GIB:.1f} GiB are free (use a 4-bit model or --device cpu)")
        if prefill_chunk is None and prefill_chunk_for(ctx, device_type) != chunk:  # short: longer passes
            longer, ws2 = fits_with(prefill_chunk_for(ctx, device_type))
            if longer >= ctx:
                chunk, ws = prefill_chunk_for(ctx, device_type), ws2
    elif ctx > fits:
        raise OlmoError(f"--ctx {ctx} does not fit: {free_bytes / GIB:.1f} GiB free allows at most {max(fits, 0)} "
                        f"tokens with {kv_cache} KV (try --ctx {max(fits // 256 * 256, 0)} or --kv-cache int8)")
    return Plan(weight_bytes, st, st * snapshots, ws, kv, ctx, free_bytes, kv_cache, chunk, gp)


def free_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:  # MemAvailable counts reclaimable page cache (the mmap'd checkpoint), unlike "free" pages
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * GIB
