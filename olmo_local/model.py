"""The Olmo Hybrid model: one definition for CPU and GPU, training and inference (spec §4–§5).

Layers operate on [B, T, d]. With a DecodeState (batch 1) they read and update the KV cache, the conv
state and the recurrent state; without one they run a fresh causal forward (training, reference).
Projections are fused at load time (GDN q|k|v|z, GDN a|b, attention q|k|v, MLP gate|up); each is a
"linear" module with ``forward(x)`` so quantized formats replace them without touching this file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmo_local.config import OlmoHybridConfig
from olmo_local.kernels.attention_cached import attention_cached
from olmo_local.kernels.attention_prefill import attention_over_int8_cache
from olmo_local.kernels.delta_rule import (chunk_gated_delta_rule_heads, gdn_gates, mask_gates,
                                           recurrent_gated_delta_rule)
from olmo_local.kernels._triton import use_triton
from olmo_local.kernels.gdn_prefill import gated_rms_norm as _gated_rms_norm
from olmo_local.kernels.gdn_recurrent import gdn_recurrent_prefill
from olmo_local.kernels.gdn_prefill import conv_state_at, gdn_prefill_prep, l2_norm  # noqa: F401  (l2_norm: public)
from olmo_local.kernels.norm import rmsnorm
from olmo_local.kernels.norm import rmsnorm_ref as rms_norm  # Olmo order, torch ops (autograd-safe)
from olmo_local.quant.linear import DenseLinear, dense_logits

if TYPE_CHECKING:
    from olmo_local.state import DecodeState

GDN_ONORM_EPS = 1e-5  # hard-coded in FLA / HF, not rms_norm_eps (pitfall P4)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float = GDN_ONORM_EPS) -> torch.Tensor:
    """Per-head norm-then-gate (spec §5.6): o, z [..., dv] (any strides); contiguous result in z.dtype."""
    return _gated_rms_norm(o, z, w, eps)


class MLP(nn.Module):
    def __init__(self, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Norm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, trainable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return rmsnorm(x, self.weight, self.eps)  # inference on GPU: the one-pass kernel
        return rms_norm(x, self.weight, self.eps)


class AttentionLayer(nn.Module):
    """Post-norm ("reordered norm") attention block, full-width q/k norm, NoPE or RoPE (spec §4.3)."""

    def __init__(self, cfg: OlmoHybridConfig, idx: int, qkv: nn.Module, o: nn.Module, q_norm: Norm,
                 k_norm: Norm, post_attn_norm: Norm, post_ff_norm: Norm, mlp: MLP) -> None:
        super().__init__()
        self.idx = idx  # index among attention layers (KV-cache slot)
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv, self.o, self.mlp = qkv, o, mlp
        self.q_norm, self.k_norm = q_norm, k_norm
        self.post_attn_norm, self.post_ff_norm = post_attn_norm, post_ff_norm

    def forward(self, x: torch.Tensor, state: DecodeState | None, rope: tuple | None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = self.q_norm(q).view(B, T, H, hd).transpose(1, 2)
        k = self.k_norm(k).view(B, T, KV, hd).transpose(1, 2)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if state is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
        elif valid is not None:  # the prefill graphs' form: the position only on the device (state.pos_t)
            state.write_kv_at(self.idx, k[0], v[0])
            scales = (state.k_scale[self.idx], state.v_scale[self.idx]) if state.kv_int8 else (None, None)
            a = attention_cached(q[0], state.k_cache[self.idx], state.v_cache[self.idx], state.pos_t, *scales)[None]
        else:
            pos = state.pos
            kv_all = state.write_kv(self.idx, k[0], v[0])             # [KV, pos+T, hd] (bf16 cache)
            if pos == 0:  # a fresh sequence: plain causal attention (the flash path on GPU)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
            elif kv_all is None:  # int8 cache: the prefix block by block, merged by log-sum-exp
                a = attention_over_int8_cache(q, *state.int8_kv(self.idx), pos)
            else:
                k_all, v_all = kv_all
                mask = None
                if T > 1:  # query i sits at pos+i and sees keys 0..pos+i
                    kpos = torch.arange(pos + T, device=x.device)
                    qpos = torch.arange(pos, pos + T, device=x.device)
                    mask = kpos[None, :] <= qpos[:, None]
                a = F.scaled_dot_product_attention(q, k_all[None].to(q.dtype), v_all[None].to(q.dtype),
                                                   attn_mask=mask, enable_gqa=H != KV)
        a = self.o(a.transpose(1, 2).reshape(B, T, H * hd))
        x = x + self.post_attn_norm(a)
        return x + self.post_ff_norm(self.mlp(x))


class GDNLayer(nn.Module):
    """Pre-norm Gated DeltaNet block (spec §4.5, §5)."""

    # CUDA inference: the delta rule of a whole prompt (gates included) in one Triton launch per layer
    # instead of the chunked torch form (~50 launches); False restores the chunked form (for A/B runs)
    fused_prefill = True

    def __init__(self, cfg: OlmoHybridConfig, idx: int, in_norm: Norm, qkvz: nn.Module, ab: nn.Module,
                 conv_w: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, o_norm_w: torch.Tensor,
                 o: nn.Module, post_norm: Norm, mlp: MLP, trainable: bool = False) -> None:
        super().__init__()
        self.idx = idx  # index among GDN layers (state slot)
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim, self.conv_dim = cfg.key_dim, cfg.value_dim, cfg.conv_dim
        self.beta_scale = 2.0 if cfg.linear_allow_neg_eigval else 1.0
        self.in_norm, self.qkvz, self.ab, self.o, self.post_norm, self.mlp = in_norm, qkvz, ab, o, post_norm, mlp
        self.conv_w = nn.Parameter(conv_w, requires_grad=trainable)       # [conv_dim, K]
        self.A_log = nn.Parameter(A_log.float(), requires_grad=trainable)  # fp32 (pitfall P5)
        self.dt_bias = nn.Parameter(dt_bias.float(), requires_grad=trainable)
        self.o_norm_w = nn.Parameter(o_norm_w, requires_grad=trainable)

    def mix(self, u: torch.Tensor, state: DecodeState | None, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = u.shape
        qkv, z = self.qkvz(u).split([self.conv_dim, self.value_dim], dim=-1)
        a, b = self.ab(u).float().split([self.hv, self.hv], dim=-1)
        conv_state = None if state is None else state.conv_state[self.idx].unsqueeze(0)
        # conv + SiLU, q/k L2 norm: head-first [B, H, T, d] fp32, the layout of the delta rule's matmuls
        q, k, v, new_conv = gdn_prefill_prep(qkv, self.conv_w, conv_state, self.hk, self.hv, self.dk, self.dv,
                                             self.dk ** -0.5)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or self.A_log.requires_grad
                                                  or self.dt_bias.requires_grad)
        if self.fused_prefill and use_triton(q) and not needs_grad:
            rec = None if state is None else state.rec_state[self.idx].unsqueeze(0)
            o = gdn_recurrent_prefill(q, k, v, a, b, self.A_log, self.dt_bias, self.beta_scale, rec, valid)
        else:
            o = self._delta_rule_torch(q, k, v, a, b, state, valid)
        if state is not None:
            if valid is not None:  # padding after the prompt: the conv state as of its last real token
                new_conv = conv_state_at(qkv, conv_state, self.conv_w.shape[-1] - 1, valid)
            state.conv_state[self.idx].copy_(new_conv[0])
        y = gated_rms_norm(o.transpose(1, 2), z.reshape(B, T, self.hv, self.dv), self.o_norm_w)
        return self.o(y.reshape(B, T, self.value_dim))

    def _delta_rule_torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          state: DecodeState | None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The delta rule in torch (CPU, training): chunked for prompts, recurrent for one token."""
        T = q.shape[2]
        cd = q.dtype
        if self.hv != self.hk:
            q = q.repeat_interleave(self.hv // self.hk, dim=1)
            k = k.repeat_interleave(self.hv // self.hk, dim=1)
        g, beta = mask_gates(*gdn_gates(a, b, self.A_log, self.dt_bias, self.beta_scale, cd), valid)
        g, beta = g.transpose(1, 2), beta.transpose(1, 2)                              # [B, Hv, T]
        if state is None:
            o, _ = chunk_gated_delta_rule_heads(q, k, v, g, beta)
            return o
        rec = state.rec_state[self.idx].unsqueeze(0)
        if T == 1:
            return recurrent_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              g.transpose(1, 2), beta.transpose(1, 2), rec).transpose(1, 2)
        o, S = chunk_gated_delta_rule_heads(q, k, v, g, beta, rec)
        rec.copy_(S)
        return o

    def forward(self, x: torch.Tensor, state: DecodeState | None, rope: tuple | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.mix(self.in_norm(x), state, valid)
        return x + self.mlp(self.post_norm(x))


def rope_tables(theta: float, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    f = positions.float()[:, None] * inv[None]
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()  # fp32, like HF (not downcast)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return (x * cos + rot * sin).to(x.dtype)


class OlmoHybridModel(nn.Module):
    """The whole network. Build a random one with ``OlmoHybridModel(config)`` (training, synthetic
    benchmarks) or load one with ``olmo_local.checkpoint.load_model``."""

    def __init__(self, config: OlmoHybridConfig, layers: list[nn.Module] | None = None,
                 embed: nn.Module | None = None, norm: Norm | None = None, lm_head: nn.Module | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        if layers is None:  # fresh, trainable parameters (values set by init_weights_)
            layers, embed, norm, lm_head = _fresh_modules(config, device, dtype)
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head  # None when tied to the embedding

    # ---- properties used by state/bench/generation ---------------------------------------
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in fp32, whatever the model dtype: accumulated in fp32 and not rounded to bf16 on the way
        (bf16 logits are 1/16 apart at 8-16, and near-tied greedy picks flipped on that rounding: on the
        demo model 21 of the bf16 path's 35 misses against fp32, docs/benchmarks.md session 13)."""
        if self.lm_head is not None:
            return self.lm_head.logits(h)
        return dense_logits(h, self.embed.weight)

    def forward(self, tokens: torch.Tensor, state: DecodeState | None = None,
                last_only: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with ``last_only``). With a state (B = 1) the
        tokens continue the sequence held in the state, which is advanced.

        ``valid`` (a device int tensor of one element, n; needs a state): only tokens[:, :n] are the prompt,
        the rest is padding (the captured prefill graphs run one padded length for many prompt lengths). The
        padding leaves the GDN states as the prompt left them and only writes KV rows past the prompt. The
        position is read from ``state.pos_t`` (RoPE, KV writes, attention over the cache: attention_cached),
        the state is not advanced (the caller advances it by n) and ``last_only`` gives the logits of token
        n - 1. Everything stays on the device: no host read of n or of the position."""
        B, T = tokens.shape
        if state is not None:
            if B != 1:
                raise ValueError("a DecodeState holds one sequence (batch 1)")
            state.check_room(T)
        x = self.embed(tokens)
        if valid is not None and state is None:
            raise ValueError("valid= (a padded prompt) needs a state")
        rope = None
        if self.config.rope_theta is not None:
            if valid is not None:  # the position on the device
                positions = state.pos_t.long() + torch.arange(T, device=tokens.device)
            else:
                start = 0 if state is None else state.pos
                positions = torch.arange(start, start + T, device=tokens.device)
            rope = rope_tables(self.config.rope_theta, self.config.head_dim, positions)
        for layer in self.layers:
            x = layer(x, state, rope, valid)
        if last_only:
            x = x[:, -1:] if valid is None else x.index_select(1, valid.reshape(1).long() - 1)
        logits = self.head(self.norm(x))
        if state is not None and valid is None:
            state.advance(tokens[0])
        return logits

    # ---- training support ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights_(self, seed: int = 0, std: float = 0.02) -> None:
        """Random values like a fresh model's, drawn on the model's device (fast for the 7B on a GPU)."""
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        cfg = self.config
        f32 = dict(device=dev, dtype=torch.float32)
        for name, p in self.named_parameters():
            if name.endswith("A_log"):
                val = torch.empty(p.shape, **f32).uniform_(1.0, 16.0, generator=gen).log()
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen, **f32) * (math.log(0.1) - math.log(0.001))
                               + math.log(0.001)).clamp(min=1e-4)
                val = dt + torch.log(-torch.expm1(-dt))
            elif name.endswith("conv_w"):
                bound = 1.0 / math.sqrt(cfg.linear_conv_kernel_dim)
                val = torch.empty(p.shape, **f32).uniform_(-bound, bound, generator=gen)
            elif p.dim() == 1 or name.endswith("o_norm_w"):
                val = torch.ones(p.shape, **f32)
            else:
                val = torch.empty(p.shape, device=dev, dtype=p.dtype).normal_(0.0, std, generator=gen)
            p.copy_(val.to(p.dtype))

    def hf_state_dict(self, split_conv: bool = True) -> dict[str, torch.Tensor]:
        """The weights under transformers' tensor names (dense models only)."""
        from olmo_local.checkpoint import to_hf_tensors
        return to_hf_tensors(self, split_conv=split_conv)


def _fresh_modules(cfg: OlmoHybridConfig, device, dtype):
    def lin(n: int, k: int) -> DenseLinear:
        return DenseLinear(torch.empty(n, k, device=device, dtype=dtype), trainable=True)

    def norm(n: int, eps: float = cfg.rms_norm_eps) -> Norm:
        return Norm(torch.ones(n, device=device, dtype=dtype), eps, trainable=True)

    d, inter = cfg.hidden_size, cfg.intermediate_size
    layers: list[nn.Module] = []
    a_i = g_i = 0
    for t in cfg.layer_types:
        mlp = MLP(lin(2 * inter, d), lin(d, inter))
        if t == "full_attention":
            H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            layers.append(AttentionLayer(cfg, a_i, lin((H + 2 * KV) * hd, d), lin(d, H * hd), norm(H * hd),
                                         norm(KV * hd), norm(d), norm(d), mlp))
            a_i += 1
        else:
            hv = cfg.linear_num_value_heads
            f32 = dict(device=device, dtype=torch.float32)
            layers.append(GDNLayer(cfg, g_i, norm(d), lin(cfg.conv_dim + cfg.value_dim, d), lin(2 * hv, d),
                                   torch.empty(cfg.conv_dim, cfg.linear_conv_kernel_dim, device=device,
                                               dtype=dtype),
                                   torch.empty(hv, **f32), torch.empty(hv, **f32),
                                   torch.ones(cfg.linear_value_head_dim, device=device, dtype=dtype),
                                   lin(d, cfg.value_dim), norm(d), mlp, trainable=True))
            g_i += 1
    embed = Embedding(torch.empty(cfg.vocab_size, d, device=device, dtype=dtype), trainable=True)
    lm_head = None if cfg.tie_word_embeddings else lin(cfg.vocab_size, d)
    return layers, embed, norm(d), lm_head


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, trainable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)
