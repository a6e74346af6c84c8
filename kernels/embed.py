"""q8 embedding lookup: the rows of ids, dequantized, in one launch.

    q8_embed(ids, qweight, scales, dtype) -> [*ids.shape, D]

qweight int8 [V, D]; scales [V] (one per row) or [V, D/G] (groups of G columns), fp16 or fp32;
row v = qweight[v] * scale (fp32 math, one rounding to ``dtype``), as quant.linear.QEmbedding.

Why: the torch form (two gathers, two casts, the product and a cast: ~6 kernels) opened every decode
graph with ~6 launches that programmatic dependent launch cannot chain; this is one, chained with the
first norm on Hopper.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, pdl_kwargs, tl, triton, use_pdl, use_triton
from .gemv_q4 import fold_outputs

if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait

__all__ = ["q8_embed", "q8_embed_ref", "q8_embed_triton"]


def q8_embed_ref(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 norm_w: torch.Tensor | None = None):
    q = qweight[ids].float()
    s = scales[ids].float()
    if s.dim() == q.dim():  # group scales [..., D/G]
        ng = s.shape[-1]
        x = (q.unflatten(-1, (ng, -1)) * s.unsqueeze(-1)).flatten(-2).to(dtype)
    else:
        x = (q * s.unsqueeze(-1)).to(dtype)
    return x if norm_w is None else fold_outputs(x, norm_w)


if HAS_TRITON:

    @triton.jit
    def _q8_embed_kernel(ids_ptr, qw_ptr, s_ptr, out_ptr, D, NG, GS, BD: tl.constexpr, GROUPS: tl.constexpr,
                         USE_PDL: tl.constexpr, nw_ptr=None, xt_ptr=None, ss_ptr=None, FOLD: tl.constexpr = False):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)  # the id is written by the previous step (the token buffer)
        t = tl.program_id(0)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        dm = d < D
        v = tl.load(ids_ptr + t).to(tl.int64)
        q = tl.load(qw_ptr + v * D + d, mask=dm, other=0).to(tl.float32)
        if GROUPS:
            s = tl.load(s_ptr + v * NG + d // GS, mask=dm, other=0).to(tl.float32)
        else:
            s = tl.load(s_ptr + v).to(tl.float32)
        x = (q * s).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + t * D + d, x, mask=dm)
        if FOLD:  # a folded norm's producer side: x~ = x * w and this block's sum of x^2
            xf = x.to(tl.float32)
            w = tl.load(nw_ptr + d, mask=dm, other=0).to(tl.float32)
            tl.store(xt_ptr + t * D + d, (xf * w).to(xt_ptr.dtype.element_ty), mask=dm)
            tl.store(ss_ptr + t * tl.num_programs(1) + tl.program_id(1), tl.sum(xf * xf, axis=0))


def q8_embed_triton(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    block_d: int | None = None, norm_w: torch.Tensor | None = None):
    v, d = qweight.shape
    groups = scales.dim() == 2
    ng = scales.shape[1] if groups else 1
    if groups and (d % ng or scales.shape[0] != v):
        raise ValueError(f"q8 embedding scales {tuple(scales.shape)} do not fit the table {tuple(qweight.shape)}")
    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64) or not flat.is_contiguous():
        flat = flat.to(torch.int64).contiguous()
    out = torch.empty((flat.numel(), d), dtype=dtype, device=qweight.device)
    bd = block_d or min(4096, next_pow2(d))
    pdl = use_pdl(qweight)
    fold = {}
    if norm_w is not None:
        if flat.numel() != 1 or norm_w.numel() != d:
            raise ValueError("the embedding's folded norm takes one id and a norm weight of the row's width")
        xt = torch.empty_like(out)
        ss = torch.empty(cdiv(d, bd), dtype=torch.float32, device=qweight.device)
        fold = dict(nw_ptr=norm_w, xt_ptr=xt, ss_ptr=ss, FOLD=True)
    _q8_embed_kernel[(flat.numel(), cdiv(d, bd))](flat, qweight.contiguous(), scales.contiguous(), out, d, ng,
                                                   d // ng, BD=bd, GROUPS=groups, USE_PDL=pdl, num_warps=4,
                                                   **fold, **pdl_kwargs(pdl))
    if norm_w is not None:
        return out.view(*ids.shape, d), xt.view(*ids.shape, d), ss
    return out.view(*ids.shape, d)


def q8_embed(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
             norm_w: torch.Tensor | None = None):
    """The rows of ids; with ``norm_w`` (one id) also the producer side of a folded RMSNorm of the row:
    (x, x~ = x * w, sums of x^2 [blocks] fp32), so that the first layer's projection takes rmsnorm(x) * w
    as rstd * (x~ @ W.T) without a norm launch."""
    if use_triton(qweight) and ids.numel() > 0:
        return q8_embed_triton(ids, qweight, scales, dtype, norm_w=norm_w)
    return q8_embed_ref(ids, qweight, scales, dtype, norm_w)
