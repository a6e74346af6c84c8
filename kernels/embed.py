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

if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait

__all__ = ["q8_embed", "q8_embed_ref", "q8_embed_triton"]


def q8_embed_ref(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = qweight[ids].float()
    s = scales[ids].float()
    if s.dim() == q.dim():  # group scales [..., D/G]
        ng = s.shape[-1]
        return (q.unflatten(-1, (ng, -1)) * s.unsqueeze(-1)).flatten(-2).to(dtype)
    return (q * s.unsqueeze(-1)).to(dtype)


if HAS_TRITON:

    @triton.jit
    def _q8_embed_kernel(ids_ptr, qw_ptr, s_ptr, out_ptr, D, NG, GS, BD: tl.constexpr, GROUPS: tl.constexpr,
                         USE_PDL: tl.constexpr):
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
        tl.store(out_ptr + t * D + d, (q * s).to(out_ptr.dtype.element_ty), mask=dm)


def q8_embed_triton(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    block_d: int | None = None) -> torch.Tensor:
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
    _q8_embed_kernel[(flat.numel(), cdiv(d, bd))](flat, qweight.contiguous(), scales.contiguous(), out, d, ng,
                                                   d // ng, BD=bd, GROUPS=groups, USE_PDL=pdl, num_warps=4,
                                                   **pdl_kwargs(pdl))
    return out.view(*ids.shape, d)


def q8_embed(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if use_triton(qweight) and ids.numel() > 0:
        return q8_embed_triton(ids, qweight, scales, dtype)
    return q8_embed_ref(ids, qweight, scales, dtype)
