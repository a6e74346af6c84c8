"""The single-token decode step with static shapes, captured once as a CUDA graph on GPU.

Everything the step touches lives in DecodeState (KV cache, conv and recurrent state, the position as a
device tensor) or in buffers allocated here once, so the step has no host syncs, no data-dependent
shapes and no Python-side decisions per token: on CUDA it is recorded into one CUDA graph and replayed;
on CPU the same Python path runs eagerly (tests compare it with the model's eager forward).

Per layer the step launches: fused dequant-GEMV for the merged input projection, the fused Gated
DeltaNet step (or attention decode over the cache), the output projection, the merged gate|up GEMV with
its SiLU·mul epilogue, the down projection, and the norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from olmo_local.generate import Sampler, SamplingParams, sampling_probs, valid_logits
from olmo_local.kernels.attention_decode import (LONG_CTX_LAUNCH, attention_decode, attention_decode_prep,
                                                 attention_prep)
from olmo_local.kernels.embed import q8_embed
from olmo_local.kernels.gdn_decode import NORM_EPS as GDN_NORM_EPS
from olmo_local.kernels.gdn_decode import gdn_decode_step
from olmo_local.kernels.gemv_q4 import q4_gemv, q4_gemv_fold, q4_gemv_silu_mul
from olmo_local.kernels.gemv_nf4 import nf4_fits, nf4_gemv
from olmo_local.kernels.gemv_q8 import q8_gemv, q8_gemv_silu_mul
from olmo_local.kernels._triton import use_triton
from olmo_local.kernels.sample import greedy_fits, greedy_triton, sample_fits, sample_triton
from olmo_local.kernels.norm import residual_norm, rmsnorm, rmsnorm_add_rmsnorm
from olmo_local.model import AttentionLayer, GDNLayer, OlmoHybridModel, apply_rope
from olmo_local.quant.linear import NF4Linear, Q4Linear, Q8Linear, QEmbedding
from olmo_local.state import DecodeState


def linear(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [1, K] through a linear module; quantized weights use the fused dequant-GEMV kernels (nf4: where
    Triton runs, i.e. on CUDA, and whole absmax blocks per row; else the module's own dequantize + matmul)."""
    if isinstance(mod, Q4Linear):
        return q4_gemv(x, mod.qweight, mod.scales, mod.mins, mod.group_size, tiled=mod.tiled)
    if isinstance(mod, Q8Linear):
        return q8_gemv(x, mod.qweight, mod.scales)
    if isinstance(mod, NF4Linear) and use_triton(x) and nf4_fits(x, mod.in_features, mod.blocksize):
        am = getattr(mod, "_absmax_f32", None)
        if am is None or am.device != x.device:  # undone double quant, kept (computed before any capture)
            am = mod._absmax_f32 = mod.absmax_fp32().contiguous()
        return nf4_gemv(x, mod.weight, am, mod.quant_map, mod.blocksize, mod.out_features)
    return mod(x)


def mlp_act(mlp: torch.nn.Module, x: torch.Tensor, rstd: tuple | None = None) -> torch.Tensor:
    """silu(gate(x)) * up(x), the down projection's input, with the gate|up GEMV and its SiLU·mul
    epilogue fused (rstd: the consumer side of a folded norm, q4 only)."""
    gu = mlp.gate_up
    if isinstance(gu, Q4Linear):
        return q4_gemv_silu_mul(x, gu.qweight, gu.scales, gu.mins, gu.group_size, tiled=gu.tiled, rstd=rstd)
    if isinstance(gu, Q8Linear):
        return q8_gemv_silu_mul(x, gu.qweight, gu.scales)
    gate, up = linear(gu, x).chunk(2, dim=-1)
    return F.silu(gate) * up


def fold(mod: torch.nn.Module, inp: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None = None,
         head_rstd: tuple | None = None):
    """A q4 projection whose output goes into the residual stream x without a norm launch
    (kernels.gemv_q4.q4_gemv_fold): -> (x + y, (x + y) * w, sums of squares), or x + y alone without w.
    head_rstd: inp is a GDN step's x~, scaled per head inside the projection (see gdn_decode_step)."""
    return q4_gemv_fold(inp, mod.qweight, mod.scales, mod.mins, mod.group_size, x, w, tiled=mod.tiled,
                        head_rstd=head_rstd)


def _dense_ab(L: GDNLayer, dtype: torch.dtype) -> torch.Tensor | None:
    """A GDN layer's a|b weight when it is a contiguous dense matrix of the model dtype (the usual case: its
    rows can ride along another launch), else None."""
    w_ab = getattr(L.ab, "weight", None)
    return w_ab if isinstance(w_ab, torch.Tensor) and w_ab.dtype == dtype and w_ab.is_contiguous() else None


def linear_norm(mod: torch.nn.Module, inp: torch.Tensor, x: torch.Tensor, mode: str,
                w: torch.Tensor | None = None, eps: float = 0.0):
    """A projection and the norm op that consumes it with the residual stream x (kernels.norm):
    "add_rmsnorm" -> (normed, x + y); "rmsnorm_add" -> x + rmsnorm(y); "add" -> x + y. The norm is its
    own one-program launch: as the GEMV's tail (the last row block normalising the whole row) it
    measured 10 % slower on the H100, split between this GEMV and the next (each row block's sum of
    squares, x normalised as the next GEMV loads it) 14 % slower on the H200 (kernels/NOTES.md). For
    q4 models the pre-norms are folded instead (fold(); +1.4 % on the H200)."""
    return residual_norm(mode, linear(mod, inp), x, w, eps)


class DecodeStep:
    """``step(token) -> logits [V]``: feeds one token at ``state.pos`` and advances the state."""

    fuse_attention_prep = True  # NoPE attention layers: kernels.attention_decode.attention_prep
    # q4 models: the GDN layers' post-norm and the residual add before an attention layer folded into
    # the GEMVs around them (fold(): no norm launch; the consumer scales its rows by rstd)
    fold_norms = True
    # an attention layer's post-feedforward norm + residual and the next layer's input norm (or the final
    # norm) in one launch (kernels.norm.rmsnorm_add_rmsnorm) instead of two
    merge_post_norms = True
    # sampling graphs draw with kernels.sample (temperature, top-p by a radix search on the probabilities
    # instead of a sort, min-p, the race with Philox noise keyed by a device step counter; 3 launches, 7
    # with top-p) when there is no top-k; off: the torch ops of generate.sampling_probs and noise drawn by
    # the host's generator before each replay
    fused_sampler = True
    # greedy graphs take the argmax with kernels.sample.greedy_triton (one PDL-chained launch that also
    # writes the next step's token) instead of torch.argmax and a copy
    fused_greedy = True
    # a cache of LONG_CTX_LAUNCH positions or more gets two captures of each graph: attention launched as
    # for a short context (fewer splits, 4 warps; correct at any length) for steps below this position,
    # and as for the long cache from it on (H200: 4 warps took 9.0 vs 11.7 us per layer at 128 positions,
    # 8 warps 132 vs 180 us at 32768)
    long_ctx_from = 12288
    # the pick kernels (greedy_triton, sample_triton) store the id straight into the pinned host slot (mapped
    # memory: the device writes it over the bus) instead of into a device buffer that a copy node of the
    # graph then moves to the slot
    ids_to_host = True
    # whether Generator.stream and bench use greedy_picks() / sample_picks() (one step in flight: the step
    # that feeds id k is launched before id k is read) instead of one greedy() / sample() call per token;
    # an instance with a graph takes this class default, one without a graph (CPU) is off (nothing to
    # overlap) unless a test turns it on
    pipelined = True
    # q4 models: a GDN layer's dense a|b projection runs as extra programs of the in-projection's launch (one
    # bf16 row each) instead of inside the GDN step, whose programs then shrink to one warp per 16 state
    # columns (with the state dk-major on CUDA)
    ab_in_projection = True
    # with the a|b rows beside it: the in-projection's split-K tail also runs the q|k|v short conv + SiLU
    # (kernels.gemv_q4 conv=), and the GDN step's gated norm goes without its rstd, which the o projection
    # applies per head (head_rstd=): the GDN step then has no per-key-head counter and last-program tail
    # (the H200 ablation timed those at ~41 us per token)
    conv_in_projection = True
    # q4 models whose first layer is a GDN layer: the q8 embedding launch also writes x * w and the row's sum
    # of squares, so the first in-projection takes the folded input norm (no norm launch, and the first GDN
    # layer gets the same a|b-beside / conv-epilogue form as the others)
    fold_embed_norm = True
    # a q4 GDN layer whose input norm is a launch of its own (after an attention layer: rmsnorm_add_rmsnorm)
    # takes the same a|b-beside / conv-epilogue / folded-GDN form as the folded ones (u with no rstd);
    # off: such a layer's GDN step projects a|b itself and runs its conv and gated norm (the counter path)
    beside_after_norm = True
    # q4 NoPE attention layers: the qkv projection's split-K tail also writes each row block's sums of squares
    # of q and k (row_sums=), and the attention kernel normalises q itself, the split that holds the current
    # position taking its k and v from the qkv row and writing them to the caches: no attention_prep launch.
    # Only where attention is launched for a short context (below LONG_CTX_LAUNCH): H200, the 7B at depth
    # 32768 with int8 KV, 294 t/s with it against 370 with attention_prep (tg128: +0.7 %)
    prep_in_attention = True
    # the same with the long-context attention launch (8 warps, ~8 programs per SM); off: attention_prep there
    prep_in_long_attention = False

    def __init__(self, model: OlmoHybridModel, state: DecodeState, use_graph: bool | None = None) -> None:
        self.model, self.state = model, state
        self.device = state.device
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = torch.zeros(1, dtype=torch.int32, device=self.device)  # pos + 1, attention_prep writes it
        cfg = model.config
        # a|b of the GDN layer in flight (ab_in_projection)
        self.ab = torch.zeros(2 * cfg.linear_num_value_heads, dtype=torch.float32, device=self.device)
        self.act = torch.zeros(cfg.conv_dim, dtype=torch.float32, device=self.device)  # conv_in_projection
        self.inv_freq = None
        if cfg.rope_theta is not None:
            hd = cfg.head_dim
            self.inv_freq = 1.0 / (cfg.rope_theta ** (
                torch.arange(0, hd, 2, dtype=torch.float32, device=self.device) / hd))
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.pipelined = type(self).pipelined and self.use_graph
        # per launch regime (see _regime): the plain graph and its logits
        self.graphs: list[tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = None
        self._ctx_hint: int | None = None  # the regime being captured (None: from the position)
        # greedy() / sample(): graphs that also pick the next token (its feedback stays on the device),
        # by kind: {"greedy" | "sample": (mode, [[graph, graph] per regime])}; the two graphs of a regime
        # differ only in the host slot the id is copied to, so that two steps can be in flight
        # (greedy_picks / sample_picks)
        self.pick_graphs: dict[str, tuple] = {}
        self.rng: torch.Generator | None = None
        self.noise = torch.ones(model.config.vocab_size, dtype=torch.float32, device=self.device)
        self.rng_state = torch.zeros(2, dtype=torch.int64, device=self.device)  # kernels.sample: (seed, step)
        self.next_id = torch.zeros(1, dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        self.host_ids = [torch.zeros(1, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host_nps = [h.numpy() for h in self.host_ids]  # read without torch's per-call overhead (~20 us)
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self._token_on_device: int | None = None  # the id greedy() left in self.token

    # ---- the static path ---------------------------------------------------------------------
    def _hints(self) -> list[int]:
        """The context sizes the attention launches are tuned for, one per regime."""
        mc = self.state.max_ctx
        return [LONG_CTX_LAUNCH - 1, mc] if mc >= LONG_CTX_LAUNCH else [mc]

    def _regime(self, pos: int) -> int:
        """The regime of the step at position ``pos``: 0 (short-context launch) or 1 (long)."""
        return 1 if len(self._hints()) > 1 and pos >= self.long_ctx_from else 0

    def forward(self, advance: bool = True) -> torch.Tensor:
        """One step on ``self.token`` at position ``state.pos_t``; advances pos_t (on the device) unless
        ``advance`` is False (a pick tail that advances it in its own last launch follows)."""
        st, m = self.state, self.model
        self._hint_now = self._ctx_hint if self._ctx_hint is not None else self._hints()[self._regime(st.pos)]
        pre = None  # the first GDN layer's input norm folded into the embedding launch: (x~, sums)
        first = m.layers[0] if len(m.layers) else None
        if self._embed_folds(first):
            x, xt, ss = q8_embed(self.token, m.embed.qweight, m.embed.scales, m.embed.dtype,
                                 norm_w=first.in_norm.weight)
            pre = (xt, ss)
        else:
            x = m.embed(self.token)  # [1, d]
        rope = None
        if self.inv_freq is not None:
            f = st.pos_t.float()[:, None] * self.inv_freq[None]
            emb = torch.cat([f, f], -1)
            rope = (emb.cos(), emb.sin())
        # a GDN layer's down projection is deferred: (down, its input), run by the next consumer of x
        # together with that consumer's norm (or plain residual add); an attention layer's last
        # rmsnorm_add likewise ("post": (down, its input, norm weight, eps)), merged with the next norm
        pending = post = None
        for layer in m.layers:
            if isinstance(layer, GDNLayer):
                x, pending = self._gdn(layer, x, pending, post, pre)
                post = pre = None
            else:
                if post is not None:  # attention after attention: the plain post-norm
                    x = linear_norm(post[0], post[1], x, "rmsnorm_add", post[2], post[3])
                    post = None
                if pending is not None:
                    if self._folds(pending[0]):
                        x = fold(*pending, x)[0]
                    else:
                        x = linear_norm(*pending, x, "add")
                    pending = None
                x, post = self._attn(layer, x, rope)
        if post is not None:
            h, x = rmsnorm_add_rmsnorm(linear(post[0], post[1]), x, post[2], post[3], m.norm.weight, m.norm.eps)
        elif pending is not None:
            h, x = linear_norm(*pending, x, "add_rmsnorm", m.norm.weight, m.norm.eps)
        else:
            h = rmsnorm(x, m.norm.weight, m.norm.eps)
        # fp32 logits (OlmoHybridModel.head); an nf4 head through its GEMV kernel, widened
        logits = (linear(m.lm_head, h).float() if isinstance(m.lm_head, NF4Linear) else m.head(h))[0]
        if advance:
            st.pos_t.add_(1)
        return logits

    def _embed_folds(self, first) -> bool:
        """Whether the step's first launch (a q8 embedding) also gives the first layer's folded input norm:
        a GDN layer whose in-projection takes a folded norm (q4, dense a|b rows)."""
        if not (self.fold_embed_norm and isinstance(first, GDNLayer) and isinstance(self.model.embed, QEmbedding)):
            return False
        return _dense_ab(first, self.model.embed.dtype) is not None and self._folds(first.qkvz)

    def _gdn(self, L: GDNLayer, x: torch.Tensor, pending: tuple | None, post: tuple | None = None,
             pre: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """Returns (x without this layer's MLP output, (down projection, its input)): the caller runs
        the down projection with the next norm. pre: (x~, sums of squares) of this layer's input norm, folded
        into the launch that formed x (the embedding)."""
        st = self.state
        w_ab = _dense_ab(L, x.dtype)
        dense_ab = w_ab is not None
        ab_kw = {}  # how the GDN step gets a|b: computed beside it (a, b given) or projected inside it
        conv = None  # (conv_in_projection) the in-projection's conv epilogue: weights, state, activations
        rs = None  # (sums of squares, eps) when u is the x~ of a folded norm (its consumers scale by rstd)
        if pre is not None:
            u, ss = pre
            rs = (ss, L.in_norm.eps)
        elif pending is not None and dense_ab and self._folds(pending[0], L.qkvz):
            # x += previous layer's MLP output; u = rmsnorm(x) * w never formed: its consumers (the
            # in-projection and the a|b projection) take x * w and scale by rstd
            x, u, ss = fold(*pending, x, L.in_norm.weight)
            rs = (ss, L.in_norm.eps)
        elif pending is not None:  # x += previous layer's MLP output, with this layer's input norm
            u, x = linear_norm(*pending, x, "add_rmsnorm", L.in_norm.weight, L.in_norm.eps)
        elif post is not None:  # x += rmsnorm(previous attention layer's MLP output), then this norm
            u, x = rmsnorm_add_rmsnorm(linear(post[0], post[1]), x, post[2], post[3], L.in_norm.weight,
                                       L.in_norm.eps)
        else:
            u = rmsnorm(x, L.in_norm.weight, L.in_norm.eps)
        if dense_ab and self._folds(L.qkvz) and (rs is not None or self.beside_after_norm):
            # q4 in-projection: the a|b rows as extra programs of its launch (times rstd when folded), and
            # with conv_in_projection its split-K tail runs the q|k|v conv
            dense = (w_ab, self.ab) if self.ab_in_projection else None
            if dense is not None and self.conv_in_projection and self._folds(L.o, L.mlp.gate_up):
                conv = (L.conv_w, st.conv_state[L.idx], self.act)
            qkvz = q4_gemv(u, L.qkvz.qweight, L.qkvz.scales, L.qkvz.mins, L.qkvz.group_size, tiled=L.qkvz.tiled,
                           rstd=rs, dense=dense, conv=conv)
            if dense is not None:  # a|b (scaled by rstd) came with the in-projection
                a, b = self.ab[: L.hv], self.ab[L.hv:]
            else:
                a = b = None
                ab_kw = dict(ab_from=(u.view(-1), w_ab), ab_rstd=rs)
        else:
            qkvz = linear(L.qkvz, u)
            if dense_ab:  # dense a|b (the usual case): projected inside the GDN step, one launch fewer
                a = b = None
                ab_kw = dict(ab_from=(u.view(-1), w_ab))
            else:
                a, b = linear(L.ab, u)[0].split([L.hv, L.hv])
        qkv, z = qkvz[0].split([L.conv_dim, L.value_dim])
        head = None  # conv: the GDN step's x~ and its heads' sums of squares, for the o projection
        y = gdn_decode_step(self.act if conv else qkv, z, a, b, L.conv_w, st.conv_state[L.idx], L.A_log,
                            L.dt_bias, L.o_norm_w, st.rec_state[L.idx], allow_neg_eigval=L.beta_scale == 2.0,
                            folded=conv is not None, **ab_kw)
        if conv is not None:
            y, hs = y
            head = (hs, GDN_NORM_EPS)
        if self._folds(L.o, L.mlp.gate_up):  # x += o; gate|up of rmsnorm(x) as rstd * gate|up(x * w)
            x, xt, ss = fold(L.o, y.view(1, -1), x, L.post_norm.weight, head_rstd=head)
            return x, (L.mlp.down, mlp_act(L.mlp, xt, rstd=(ss, L.post_norm.eps)))
        h, x = linear_norm(L.o, y.view(1, -1), x, "add_rmsnorm", L.post_norm.weight, L.post_norm.eps)  # x += o
        return x, (L.mlp.down, mlp_act(L.mlp, h))

    def _folds(self, *mods: torch.nn.Module) -> bool:
        return self.fold_norms and all(isinstance(m, Q4Linear) for m in mods)

    def _attn(self, L: AttentionLayer, x: torch.Tensor, rope) -> tuple[torch.Tensor, tuple | None]:
        st = self.state
        H, KV, hd = L.n_heads, L.n_kv, L.hd
        i = L.idx
        scales = dict(k_scale=st.k_scale[i], v_scale=st.v_scale[i]) if st.kv_int8 else {}
        short = self._hint_now < LONG_CTX_LAUNCH  # the attention launch tuned for a short context
        if (rope is None and self.fuse_attention_prep and self.prep_in_attention
                and (short or self.prep_in_long_attention) and self._folds(L.qkv)):
            # NoPE, q4: the qkv launch gives q's and k's sums of squares, the attention launch does the rest
            qkv, ss = q4_gemv(x, L.qkv.qweight, L.qkv.scales, L.qkv.mins, L.qkv.group_size, tiled=L.qkv.tiled,
                              row_sums=(H * hd, KV * hd))
            o = attention_decode_prep(qkv, ss, L.q_norm.weight, L.k_norm.weight, L.q_norm.eps, L.k_norm.eps,
                                      st.k_cache[i], st.v_cache[i], st.pos_t, ctx_hint=self._hint_now, **scales)
            return self._attn_out(L, x, o)
        qkv = linear(L.qkv, x)
        if rope is None and self.fuse_attention_prep:  # NoPE (the 7B): norms, cache writes, length: 1 launch
            q = attention_prep(qkv, L.q_norm.weight, L.k_norm.weight, L.q_norm.eps, L.k_norm.eps, st.k_cache[i],
                               st.v_cache[i], st.pos_t, self.length, **scales)
            o = attention_decode(q, st.k_cache[i], st.v_cache[i], pos=st.pos_t, ctx_hint=self._hint_now, **scales)
            return self._attn_out(L, x, o)
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q = rmsnorm(q, L.q_norm.weight, L.q_norm.eps).view(H, 1, hd)
        k = rmsnorm(k, L.k_norm.weight, L.k_norm.eps).view(KV, 1, hd)
        v = v.view(KV, 1, hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        st.write_kv_at(i, k, v)
        o = attention_decode(q.view(H, hd), st.k_cache[i], st.v_cache[i], pos=st.pos_t, ctx_hint=self._hint_now,
                             **scales)
        return self._attn_out(L, x, o)

    def _attn_out(self, L: AttentionLayer, x: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """o projection, post-attention norm + residual, MLP, post-feedforward norm + residual; with
        merge_post_norms the last is returned undone, (down, its input, weight, eps), for the next norm."""
        n1, n2 = L.post_attn_norm, L.post_ff_norm
        x = linear_norm(L.o, o.reshape(1, -1).to(x.dtype), x, "rmsnorm_add", n1.weight, n1.eps)
        act = mlp_act(L.mlp, x)
        if self.merge_post_norms:
            return x, (L.mlp.down, act, n2.weight, n2.eps)
        return linear_norm(L.mlp.down, act, x, "rmsnorm_add", n2.weight, n2.eps), None

    # ---- graph capture and the per-token calls -----------------------------------------------
    def _forward_pick(self, mode: tuple, slot: int = 0) -> None:
        """The step and its pick tail (see _pick_tail); pos_t advances in the tail's last kernel where it
        is a Triton kernel (no torch launch between the lm_head and the pick), else in forward()."""
        adv = self._tail_advances(mode)
        self._pick_tail(self.forward(advance=not adv), mode, slot, advance=adv)

    def _tail_advances(self, mode: tuple) -> bool:
        if self.device.type != "cuda":
            return False
        if mode[0] == "greedy":
            return self.fused_greedy and greedy_fits(self.noise)
        return self._fused_draw(self.noise, mode[1])

    def _pick_tail(self, logits: torch.Tensor, mode: tuple, slot: int = 0, advance: bool = False) -> None:
        """The next token chosen on the device, written to the token buffer (the next step's input) and
        copied to host memory; all on the stream, so it can be part of the graph. mode = ("greedy",
        n_valid): argmax over the valid ids; ("sample", params, n_valid): a draw from
        generate.sampling_probs by the exponential race, argmax(p / E) with E ~ Exp(1): without top-k on
        CUDA all in kernels.sample (noise from Philox keyed by rng_state), otherwise torch ops with E from
        the ``noise`` buffer (filled before each replay by the step's own seeded generator)."""
        lg = valid_logits(logits, mode[-1])
        pos = self.state.pos_t if advance else None
        # the Triton picks write the id where the host reads it (see ids_to_host), else to next_id and a copy
        direct = self.ids_to_host and lg.is_cuda and self.host_ids[slot].is_pinned()
        out_id = self.host_ids[slot] if direct else self.next_id
        if mode[0] == "sample" and self._fused_draw(lg, mode[1]):
            p = mode[1]
            sample_triton(lg, p.temperature, p.top_p, p.min_p, self.rng_state, out_id, self.token, pos=pos)
            if not direct:
                self.host_ids[slot].copy_(self.next_id, non_blocking=True)
            return
        if mode[0] == "sample":
            probs = sampling_probs(lg.float(), mode[1])
            # ids outside the support never win, whatever the noise (an E of exactly 0 would make 0 / 0)
            lg = (probs / self.noise[: probs.numel()]).masked_fill(probs == 0, -1.0)
        if mode[0] == "greedy" and self.fused_greedy and lg.is_cuda and greedy_fits(lg):
            greedy_triton(lg, out_id, self.token, pos=pos)
            if direct:
                return
        else:
            assert pos is None, "only the Triton pick tails advance the position"
            torch.argmax(lg.view(1, -1), dim=1, out=self.next_id)
            self.token.copy_(self.next_id)
        self.host_ids[slot].copy_(self.next_id, non_blocking=True)

    def _fused_draw(self, lg: torch.Tensor, params) -> bool:
        """Whether the sampling graph draws with kernels.sample (else the torch ops and host noise)."""
        return self.fused_sampler and lg.is_cuda and sample_fits(lg, params.top_k)

    def capture(self, mode: tuple | None = None) -> None:
        """Record the step into CUDA graphs, one per regime (warm-up runs compile the kernels first; the
        state is restored afterwards, so capturing does not change the conversation). With a ``mode``
        (see _pick_tail) the recorded step also picks the next token: the greedy or the sampling graphs,
        two per regime (one per host slot). All of one call's graphs share one memory pool."""
        snap = self.state.snapshot()
        rng = self.rng_state.clone()  # the warm-up draws must not advance a seeded reply's steps
        self.token.fill_(0)
        pool = None
        plain, picks = [], []
        try:
            for hint in self._hints():
                self._ctx_hint = hint
                s = torch.cuda.Stream(device=self.device)
                s.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(s), torch.inference_mode():
                    for _ in range(2):
                        if mode is not None:
                            self._forward_pick(mode)
                        else:
                            self.forward()
                        self.state.pos_t.fill_(snap.pos)
                torch.cuda.current_stream(self.device).wait_stream(s)
                pair = []
                for slot in ((0, 1) if mode is not None else (0,)):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                        if mode is not None:
                            self._forward_pick(mode, slot)
                        else:
                            plain.append((graph, self.forward()))
                    pool = pool or graph.pool()
                    pair.append(graph)
                picks.append(pair)
        finally:
            self._ctx_hint = None
        if mode is None:
            self.graphs = plain
        else:
            self.pick_graphs[mode[0]] = (mode, picks)
        self.state.restore(snap)
        self.rng_state.copy_(rng)
        self._token_on_device = None
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        st = self.state
        st.check_room(1)
        if self.use_graph and self.graphs is None:
            self.capture()  # before the token is set: capturing runs warm-up steps on token 0
        self.token.fill_(token)
        self._token_on_device = None
        if self.use_graph:
            graph, logits = self.graphs[self._regime(st.pos)]
            graph.replay()
        else:
            logits = self.forward()
        st.pos += 1
        st.tokens.append(int(token))
        return logits

    def greedy(self, token: int, n_valid: int | None = None) -> int:
        """Feed ``token`` and return the most likely next id (among ids < n_valid): the same as
        ``int(self(token)[:n_valid].argmax())``, but on CUDA the argmax, the feedback into the next
        step's input and the copy to the host are part of the graph, so the host only waits for the
        id: no argmax launch, no token upload when ``token`` is the id the last call returned."""
        if not self.use_graph:
            with torch.inference_mode():
                return int(torch.argmax(valid_logits(self(token), n_valid)))
        return self._pick_one(self.greedy_picks(token, 1, n_valid))

    def seed_sampler(self, seed: int | None) -> None:
        """Seed the generator of sample() (a random seed for None), as a Sampler is seeded per reply."""
        gen = torch.Generator(device=self.device)
        if seed is None:
            seed = gen.seed()
        else:
            gen.manual_seed(seed)
        self.rng = gen
        self.rng_state.copy_(torch.tensor([seed % (1 << 62), 0], dtype=torch.int64))

    def sample(self, token: int, params, n_valid: int | None = None) -> int:
        """Feed ``token`` and draw the next id from generate.sampling_probs(params) over ids < n_valid
        (temperature > 0, no repetition penalty): on CUDA inside the graph (see _pick_tail), so the host
        runs no sampler kernels and makes no round trip besides reading the id. Without a graph: the
        host Sampler's draw."""
        if self.rng is None:
            self.seed_sampler(None)
        if not self.use_graph:
            with torch.inference_mode():
                logits = self(token)
                return int(torch.multinomial(Sampler.probs(logits, params, n_valid), 1, generator=self.rng))
        return self._pick_one(self.sample_picks(token, params, 1, n_valid))

    @staticmethod
    def _pick_one(picks: Iterator[int]) -> int:
        """The one id of a picks() run of limit 1 (run to its end: nothing is left in flight)."""
        (nxt,) = picks
        return nxt

    def greedy_picks(self, token: int, limit: int, n_valid: int | None = None) -> Iterator[int]:
        """The ids of up to ``limit`` greedy() calls, the first fed ``token`` and each later one the id
        before it, with one step in flight (see picks)."""
        return self.picks(token, ("greedy", n_valid), limit)

    def sample_picks(self, token: int, params, limit: int, n_valid: int | None = None) -> Iterator[int]:
        """As greedy_picks for sample(): the same draws as that many sample() calls."""
        if self.rng is None:
            self.seed_sampler(None)
        # the graph depends on these four only (a change of seed or length does not recapture)
        key = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p)
        before = None
        if not self._fused_draw(self.noise, key):  # the torch draw: noise from the host's generator
            n = n_valid if n_valid is not None else self.model.config.vocab_size

            def before() -> None:
                with torch.inference_mode():
                    self.noise[:n].exponential_(generator=self.rng)  # on the stream, before the replay

        return self.picks(token, ("sample", key, n_valid), limit, before)

    def picks(self, token: int, mode: tuple, limit: int, before: Callable[[], None] | None = None
              ) -> Iterator[int]:
        """Yield the ids of up to ``limit`` steps that pick on the device (mode as _pick_tail): the first
        step feeds ``token``, each later one the id the step before it picked (the feedback stays on the
        device). The step that feeds id k is launched before id k is read, so the GPU does not wait for
        the host between tokens (the two pick graphs copy their ids to two host slots). A step is
        launched only while the context has room. When the consumer stops early (a stop id, Ctrl-C),
        the step in flight has fed the last id yielded: closing waits for it and the state holds that id
        (pos and tokens agree with what the device computed). Without a graph the steps run eagerly,
        one at a time, with the same bookkeeping. The hot path enters no inference-mode context (a graph
        replay records nothing for autograd), waits on an event instead of a stream sync (~15 us less per
        token, H100) and reads the pinned id through numpy."""
        st = self.state
        if limit < 1:
            return
        graphs = None
        if self.use_graph:
            have = self.pick_graphs.get(mode[0])
            if have is None or have[0] != mode:
                with torch.inference_mode():
                    self.capture(mode)
                have = self.pick_graphs[mode[0]]
            graphs = have[1]
        inputs = [int(token)]  # inputs[j]: the id step j feeds (known once step j - 1 is read)
        n_launched = n_read = 0

        def launch(feed: int | None) -> None:
            nonlocal n_launched
            st.check_room(1)
            slot = n_launched % 2
            if feed is not None and self._token_on_device != feed:
                with torch.inference_mode():
                    self.token.fill_(feed)
            if before is not None:
                before()
            if graphs is not None:
                graphs[self._regime(st.pos)][slot].replay()
                if self._events is not None:
                    self._events[slot].record()
            else:
                with torch.inference_mode():
                    self._forward_pick(mode, slot)
            st.pos += 1
            n_launched += 1

        def read() -> int:
            nonlocal n_read
            slot = n_read % 2
            if self._events is not None:
                self._events[slot].synchronize()
            nxt = int(self._host_nps[slot][0])
            st.tokens.append(inputs[n_read])
            inputs.append(nxt)
            n_read += 1
            self._token_on_device = nxt
            return nxt

        launch(token)
        try:
            while n_read < n_launched:
                if n_launched < limit and st.room >= 1:
                    launch(None)
                yield read()
        finally:
            while n_read < n_launched:  # the consumer stopped: book the step in flight
                read()


