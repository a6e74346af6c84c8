"""DecodeState: every buffer a decode step touches, preallocated (docs/contracts.md).

The KV cache of the attention layers is sized to ``max_ctx`` up front; the GDN conv and recurrent
states are fixed-size. ``snapshot()``/``restore()`` capture a position cheaply (conv + recurrent state
and the KV length; cache rows past the length are simply overwritten later), so regenerate / undo /
branch / prompt reuse never re-prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_local.config import OlmoHybridConfig
from olmo_local.errors import OlmoError


@dataclass
class Snapshot:
    pos: int
    tokens: list[int]
    conv_state: torch.Tensor
    rec_state: torch.Tensor

    @property
    def nbytes(self) -> int:
        return (self.conv_state.numel() * self.conv_state.element_size()
                + self.rec_state.numel() * self.rec_state.element_size())


class DecodeState:
    # the recurrent state stored dk-major (see __init__): None on CUDA only (the default), True / False always /
    # never (tests, A/B runs)
    rec_dk_major: bool | None = None

    def __init__(self, config: OlmoHybridConfig, max_ctx: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, kv_cache: str = "bf16") -> None:
        if max_ctx <= 0:
            raise OlmoError(f"context size must be positive, got {max_ctx}")
        if kv_cache not in ("bf16", "int8"):
            raise OlmoError(f"unknown --kv-cache {kv_cache!r} (use bf16 or int8)")
        self.config, self.max_ctx = config, max_ctx
        self.device, self.dtype = torch.device(device), dtype
        self.kv_int8 = kv_cache == "int8"
        nA, nG = len(config.attn_layers), len(config.gdn_layers)
        kv = (nA, config.num_key_value_heads, max_ctx, config.head_dim)
        kv_dtype = torch.int8 if self.kv_int8 else dtype  # "bf16" means the model dtype
        self.k_cache = torch.zeros(kv, device=device, dtype=kv_dtype)
        self.v_cache = torch.zeros(kv, device=device, dtype=kv_dtype)
        # int8 KV: one fp32 scale per (layer, head, position)
        self.k_scale = torch.zeros(kv[:3], device=device, dtype=torch.float32) if self.kv_int8 else None
        self.v_scale = torch.zeros(kv[:3], device=device, dtype=torch.float32) if self.kv_int8 else None
        self.conv_state = torch.zeros(nG, config.conv_dim, config.linear_conv_kernel_dim - 1,
                                      device=device, dtype=dtype)
        hv, dk, dv = config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
        dk_major = self.device.type == "cuda" if self.rec_dk_major is None else self.rec_dk_major
        if dk_major:
            # [.., dk, dv] as the transpose of a [.., dv, dk] tensor: the decode step's one-warp programs sum
            # over dk with shuffles and load each state column contiguously (kernels/gdn_decode.py)
            self.rec_state = torch.zeros(nG, hv, dv, dk, device=device, dtype=torch.float32).transpose(2, 3)
        else:
            self.rec_state = torch.zeros(nG, hv, dk, dv, device=device, dtype=torch.float32)
        self.pos = 0
        self.pos_t = torch.zeros(1, device=device, dtype=torch.int32)
        self.tokens: list[int] = []

    # ---- bookkeeping ---------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(config: OlmoHybridConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        esize = torch.tensor([], dtype=dtype).element_size()
        return 2 * len(config.attn_layers) * config.num_key_value_heads * config.head_dim * esize

    @staticmethod
    def fixed_bytes(config: OlmoHybridConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        esize = torch.tensor([], dtype=dtype).element_size()
        nG = len(config.gdn_layers)
        conv = nG * config.conv_dim * (config.linear_conv_kernel_dim - 1) * esize
        rec = nG * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
        return conv + rec

    @property
    def nbytes(self) -> int:
        ts = [self.k_cache, self.v_cache, self.conv_state, self.rec_state, self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def room(self) -> int:
        return self.max_ctx - self.pos

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_ctx:
            raise OlmoError(f"context full: {self.pos} + {n} tokens exceed the context of {self.max_ctx} "
                            "(start a new conversation or raise --ctx)")

    def advance(self, tokens: torch.Tensor) -> None:
        self.advance_ids(tokens.tolist())

    def advance_ids(self, ids: list[int]) -> None:
        self.tokens.extend(int(t) for t in ids)
        self.pos += len(ids)
        self.pos_t.fill_(self.pos)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store k, v [KV, T, hd] at the current position. bf16 cache: return the valid cache
        [KV, pos+T, hd]. int8 cache: return None; the caller reads the quantized prefix through
        ``int8_kv(layer)`` block by block (dequantizing it whole would need ~4 bytes per cached value)."""
        self.write_kv_at(layer, k, v)
        if self.kv_int8:
            return None
        end = self.pos + k.shape[1]
        return self.k_cache[layer, :, :end], self.v_cache[layer, :, :end]

    def write_kv_at(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [KV, T, hd] at the position held on the device (pos_t, equal to pos), as a CUDA graph can:
        no host read of the position (the caller keeps pos + T within the cache). int8: codes and scales."""
        if self.kv_int8:
            from olmo_local.kernels.attention_decode import quantize_kv_int8
            quantize_kv_int8(k.contiguous(), out=(self.k_cache[layer], self.k_scale[layer]), pos=self.pos_t)
            quantize_kv_int8(v.contiguous(), out=(self.v_cache[layer], self.v_scale[layer]), pos=self.pos_t)
            return
        t = k.shape[1]
        idx = self.pos_t.long() if t == 1 else self.pos_t.long() + torch.arange(t, device=k.device)
        self.k_cache[layer].index_copy_(1, idx, k.to(self.k_cache.dtype))
        self.v_cache[layer].index_copy_(1, idx, v.to(self.v_cache.dtype))

    def int8_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k int8 [KV, max_ctx, hd], k scales fp32 [KV, max_ctx], v, v scales) of one attention layer."""
        return self.k_cache[layer], self.k_scale[layer], self.v_cache[layer], self.v_scale[layer]

    # ---- snapshots -----------------------------------------------------------------------
    def reset(self) -> None:
        self.conv_state.zero_()
        self.rec_state.zero_()
        self.pos = 0
        self.pos_t.zero_()
        self.tokens = []

    def snapshot(self) -> Snapshot:
        return Snapshot(self.pos, list(self.tokens), self.conv_state.clone(), self.rec_state.clone())

    def restore(self, snap: Snapshot) -> None:
        if snap.pos > self.max_ctx:
            raise OlmoError("snapshot does not fit this context size")
        self.conv_state.copy_(snap.conv_state)
        self.rec_state.copy_(snap.rec_state)
        self.pos = snap.pos
        self.pos_t.fill_(snap.pos)
        self.tokens = list(snap.tokens)

    def common_prefix(self, tokens: list[int]) -> int:
        """Length of the longest common prefix of ``tokens`` and what the state has consumed."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return n
