#!/usr/bin/env python
"""`olmo-local bench` with one q4 decode-GEMV variant switched in, for same-card A/B runs.

    python scripts/gpu_bench_variant.py VARIANT [bench arguments...]

VARIANT: LAYOUT[stN][pf2][quad] with LAYOUT std (q4 linears in the standard layout), tiled (the tiled
layout) or default (the package defaults); stN: Triton-pipelined group loop with N stages instead of
the hand prefetch; pf2: hand prefetch two groups ahead; quad: gate|up programs with four tiles (BN
gate + BN up rows) instead of gate|up row pairs; wideP[gQ]: gemv_q4.WIDE_PROGRAMS with P programs per SM (Q for gate|up, default P); rN: N
rows per warp in the tensor-core path (16 default, 32: each thread loads twice the bytes per group);
a trailing "-unfused" runs NoPE attention layers
through the separate q/k norm and cache-write ops instead of attention_prep; "-chunked" prefills GDN
layers with the chunked torch delta rule instead of the one-launch Triton recurrence; "-narrow" launches
q4 GEMVs with 16 rows per warp and ~6-7 programs per SM (the default before the wide-program rule);
"-splitloop" adds split-K partials with the loop over splits instead of one 2-D load; "-attnwN", "-prepwN",
"-normwN" (last, any order): N warps for attention decode below 16K positions of cache (SHORT_CTX_WARPS),
attention_prep (PREP_WARPS), one-row norm launches (norm.DECODE_WARPS); "-attnbsN": N positions per
attention K/V tile below 16K positions of cache (SHORT_CTX_BLOCK); "-attnsmN": attention splits for
N programs per SM below 16K positions of cache (SHORT_CTX_PER_SM, default 4); "-nopipe": one greedy() call per token instead of the
pipelined picks (DecodeStep.pipelined off); "-torchargmax": the greedy graph takes torch.argmax and a copy
instead of kernels.sample.greedy_triton; "-oldends": the q8 embedding in torch ops and pos_t advanced by a torch
add (as before the q8_embed kernel and the pick tails' position update); "-oneregime": decode graphs of a long
cache launch attention as for the long cache at every position (DecodeStep.long_ctx_from = 0); "-nofold": the
norms as their own launches instead of folded into the q4 GEMVs around them (DecodeStep.fold_norms off);
"-nomerge": an attention layer's last rmsnorm_add and the next norm as two launches (merge_post_norms off);
"-nofoldpre": a folded norm's producer loads the residual and weight rows in its split-K tail (FOLD_PRELOAD off);
"-nopw2": the q4 tensor-core GEMV loads only its first group before the PDL wait (PREWAIT_TWO off);
"-nonf4": nf4 projections through NF4Linear's dequantize + matmul instead of the fused nf4 GEMV;
"-rpw32": wide tensor-core programs of 32 rows per warp (gemv_q4.WIDE_ROWS_PER_WARP; default 64), e.g. with
wide3 (three programs per SM) and pf2 (the hand prefetch two groups ahead); "-gdnBwW" (last): the GDN step with
B state columns per program and W warps (e.g. -gdn32w4); "-contig": the recurrent state stored contiguous
(DecodeState.rec_dk_major off) instead of dk-major; "-abinside": a GDN layer's a|b projection inside the GDN
step (DecodeStep.ab_in_projection off) instead of beside the in-projection (e.g. default-abinside-contig: as
before session 9); "-idcopy": the pick kernels write the id to a device buffer that a copy node moves to the
pinned host slot (DecodeStep.ids_to_host off) instead of storing it into the slot directly; "-earlystores": the
GDN step stores its state slice and v conv state before its counter's atomic (gdn_decode.LATE_STORES off);
"-convinstep": the q|k|v conv and the gated norm's rstd inside the GDN step, with its counter and tail
(DecodeStep.conv_in_projection off) instead of the in-projection's conv epilogue and the o projection's head_rstd;
"-hnloop": the o projection's head_rstd loads each head's partial sums at every group (gemv_q4.HEAD_RSTD_ONCE off);
"-noembedfold": the first GDN layer's input norm as its own launch (DecodeStep.fold_embed_norm off) instead of
folded into the q8 embedding launch; "-nobesidenorm": GDN layers after an attention layer keep the a|b projection,
conv and gated norm inside their GDN step (DecodeStep.beside_after_norm off); "-prepsep": attention_prep as its
own launch between the qkv projection and attention (DecodeStep.prep_in_attention off) instead of the q/k sums
from the qkv launch and the rest inside attention; "-kvafter": attention_decode_prep loads its first K/V tile after
the PDL wait (attention_decode.KV_BEFORE_WAIT off) instead of before it; "-normlate": the one-row norm launches
load their weights after the PDL wait and the residual after the first reduction (norm.LOADS_EARLY off);
"-q8nopdl": the q8 GEMVs (the lm_head) without programmatic dependent launch (gemv_q8.Q8_PDL off); "-preplong":
attention_prep's work inside attention with the long-context launch too (DecodeStep.prep_in_long_attention);
"-attnregN" (last): that launch with ptxas's register cap N (attention_decode.LONG_CTX_PREP_MAXNREG);
"-noprefgraph": fresh prompts prefill eagerly (OLMO_LOCAL_PREFILL_GRAPH=0) instead of through the padded CUDA
graphs of olmo_local.prefill_graph; "-bf16head": the lm_head's logits in bf16 (each format's ``logits`` is its
forward) instead of fp32.
"""

from __future__ import annotations

import re
import sys

import importlib

import olmo_local.kernels.gemv_q4 as k4
import olmo_local.quant.linear as ql


ka = importlib.import_module("olmo_local.kernels.attention_decode")


def main() -> int:
    variant, args = sys.argv[1], sys.argv[2:]
    import olmo_local.decode as dec

    import olmo_local.model as mdl

    kn = importlib.import_module("olmo_local.kernels.norm")
    k8 = importlib.import_module("olmo_local.kernels.gemv_q8")
    knobs = {"attnw": (ka, "SHORT_CTX_WARPS"), "prepw": (ka, "PREP_WARPS"), "normw": (kn, "DECODE_WARPS"),
             "attnsm": (ka, "SHORT_CTX_PER_SM"), "attnbs": (ka, "SHORT_CTX_BLOCK"),
             "attnreg": (ka, "LONG_CTX_PREP_MAXNREG")}
    while (m_w := re.search(r"-(attnw|prepw|normw|attnsm|attnbs|attnreg)(\d+)$", variant)):  # small decode kernels' launches
        mod, attr = knobs[m_w.group(1)]
        setattr(mod, attr, int(m_w.group(2)))
        variant = variant[: m_w.start()]
    m_gdn = re.search(r"-gdn(\d+)w(\d+)$", variant)
    if m_gdn:  # the GDN step's state columns per program and warps, whichever configuration runs
        kg = importlib.import_module("olmo_local.kernels.gdn_decode")
        kg.BLOCK_V = kg.SMALL_BLOCK_V = int(m_gdn.group(1))
        kg.NUM_WARPS = kg.SMALL_WARPS = int(m_gdn.group(2))
        variant = variant[: m_gdn.start()]
    if variant.endswith("-earlystores"):  # the GDN step's state stores before its counter's atomic
        importlib.import_module("olmo_local.kernels.gdn_decode").LATE_STORES = False
        variant = variant[: -len("-earlystores")]
    if variant.endswith("-nonf4"):
        dec.nf4_fits = lambda *a: False
        variant = variant[: -len("-nonf4")]
    if variant.endswith("-bf16head"):  # the lm_head's logits in the model dtype (before fp32 logits)
        from olmo_local.quant.linear import _QLinearBase

        _QLinearBase.logits = lambda self, x: self.forward(x)
        for cls in _QLinearBase.__subclasses__():
            cls.logits = _QLinearBase.logits
        variant = variant[: -len("-bf16head")]
    if variant.endswith("-noprefgraph"):  # fresh prompts prefill eagerly instead of through the prefill graphs
        import os

        os.environ["OLMO_LOCAL_PREFILL_GRAPH"] = "0"
        variant = variant[: -len("-noprefgraph")]
    if variant.endswith("-oldends"):
        import olmo_local.kernels.embed as ke

        ke.q8_embed = ke.q8_embed_ref
        dec.DecodeStep._tail_advances = lambda self, mode: False
        variant = variant[: -len("-oldends")]
    import olmo_local.state as sta

    for suffix, cls, attr, value in (("-contig", sta.DecodeState, "rec_dk_major", False),
                                     ("-abinside", dec.DecodeStep, "ab_in_projection", False),
                                     ("-unfused", dec.DecodeStep, "fuse_attention_prep", False),
                                     ("-chunked", mdl.GDNLayer, "fused_prefill", False),
                                     ("-narrow", k4, "WIDE_PROGRAMS", False),
                                     ("-splitloop", k4, "SPLITK_TREE_MAX", 0),
                                     ("-nopipe", dec.DecodeStep, "pipelined", False),
                                     ("-oneregime", dec.DecodeStep, "long_ctx_from", 0),
                                     ("-nofold", dec.DecodeStep, "fold_norms", False),
                                     ("-nomerge", dec.DecodeStep, "merge_post_norms", False),
                                     ("-nofoldpre", k4, "FOLD_PRELOAD", False),
                                     ("-nopw2", k4, "PREWAIT_TWO", False),
                                     ("-rpw32", k4, "WIDE_ROWS_PER_WARP", 32),
                                     ("-torchargmax", dec.DecodeStep, "fused_greedy", False),
                                     ("-idcopy", dec.DecodeStep, "ids_to_host", False),
                                     ("-convinstep", dec.DecodeStep, "conv_in_projection", False),
                                     ("-hnloop", k4, "HEAD_RSTD_ONCE", False),
                                     ("-noembedfold", dec.DecodeStep, "fold_embed_norm", False),
                                     ("-nobesidenorm", dec.DecodeStep, "beside_after_norm", False),
                                     ("-prepsep", dec.DecodeStep, "prep_in_attention", False),
                                     ("-preplong", dec.DecodeStep, "prep_in_long_attention", True),
                                     ("-kvafter", ka, "KV_BEFORE_WAIT", False),
                                     ("-normlate", kn, "LOADS_EARLY", False),
                                     ("-q8nopdl", k8, "Q8_PDL", False)):
        if variant.endswith(suffix):
            setattr(cls, attr, value)
            variant = variant[: -len(suffix)]
    m = re.fullmatch(r"(std|tiled|default)(?:st(\d))?(pf2)?(quad)?(?:wide([\d.]+)(?:g([\d.]+))?)?(?:r(\d+))?", variant)
    if not m:
        print(f"unknown variant {variant!r}", file=sys.stderr)
        return 2
    layout, stages = m.group(1), m.group(2)
    if layout == "std":
        ql.Q4Linear.tile_ = lambda self: False  # keep the standard layout on the GPU
    if stages:
        k4.DEFAULT_PREFETCH = False
        k4.DEFAULT_STAGES = int(stages)
    elif layout != "default":
        k4.DEFAULT_PREFETCH = True
    if m.group(3):
        k4.DEFAULT_PREFETCH_DEPTH = 2
    if m.group(4):
        k4.DEFAULT_GATE_HALVES = False
    if m.group(5):
        k4.WIDE_PROGRAMS = True
        k4.WIDE_PER_SM = float(m.group(5))
        k4.WIDE_PER_SM_GATED = float(m.group(6) or m.group(5))
    if m.group(7):
        k4.DEFAULT_MMA_ROWS_PER_WARP = int(m.group(7))
    from olmo_local.cli import main as cli_main

    sys.argv = ["olmo-local", "bench", *args]
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
