"""RMSNorm in the Olmo order (spec §4.2): normalise in fp32, multiply by the weight in fp32, then cast.

    rmsnorm(x, w, eps, out=None) -> w * x * rsqrt(mean(x^2) + eps)              (x.dtype)
    add_rmsnorm(x, residual, w, eps, out=None, residual_out=None) -> (normed, new_residual)
        new_residual = residual + x (rounded to residual.dtype), normed = rmsnorm(new_residual)
        -- the pre-norm pattern of the GDN layers (x is the sublayer output); normed has x.dtype.
    rmsnorm_add(x, residual, w, eps, out=None) -> residual + rmsnorm(x)
        -- the post-norm pattern of the attention layers (x is the sublayer output); the norm is
           rounded to x.dtype before the add, as transformers does; result in residual.dtype.
    rmsnorm_add_rmsnorm(x, residual, w, eps, w2, eps2) -> (rmsnorm(new_residual) with w2, new_residual),
        new_residual = rmsnorm_add(x, residual, w, eps)
        -- a post-norm attention layer's output straight into the next layer's pre-norm (or the final
           norm): the two ops in one launch
    residual_add(x, residual, out=None) -> residual + x (rounded to residual.dtype; no norm)
        -- a decode-step add in the same kernel, so that it joins the programmatic-dependent-launch
           chain (a torch add would break it)
Rows are the last dim (width up to ~16k), any leading shape. residual_out / out may alias the
inputs (each element is read before it is written by the same program).
Kernel: one program per row, the whole row in registers, one pass.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, tl, triton, pdl_kwargs, use_pdl, use_triton

__all__ = [
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "add_rmsnorm_triton",
    "residual_norm",
    "residual_add",
    "residual_add_ref",
    "residual_add_triton",
    "rmsnorm_add_rmsnorm",
    "rmsnorm_add_rmsnorm_ref",
    "rmsnorm_add_rmsnorm_triton",
    "rmsnorm",
    "rmsnorm_add",
    "rmsnorm_add_ref",
    "rmsnorm_add_triton",
    "rmsnorm_ref",
    "rmsnorm_triton",
]


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def _norm_f32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(torch.float32)


def _put(val: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return val.to(dtype)
    out.copy_(val)
    return out


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    return _put(_norm_f32(x, w, eps), x.dtype, out)


def add_rmsnorm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    new_res = (residual.to(torch.float32) + x.to(torch.float32)).to(residual.dtype)
    normed = _put(_norm_f32(new_res, w, eps), x.dtype, out)
    if residual_out is not None:
        residual_out.copy_(new_res)
        new_res = residual_out
    return normed, new_res


def residual_add_ref(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _put(residual.to(torch.float32) + x.to(torch.float32), residual.dtype, out)


def rmsnorm_add_ref(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    normed = _norm_f32(x, w, eps).to(x.dtype)
    return _put(residual.to(torch.float32) + normed.to(torch.float32), residual.dtype, out)


def rmsnorm_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, w2: torch.Tensor,
                            eps2: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_res = rmsnorm_add_ref(x, residual, w, eps)
    return rmsnorm_ref(new_res, w2, eps2).to(x.dtype), new_res


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, D, eps,
                        stride_x, stride_r, stride_y, stride_ro,
                        BD: tl.constexpr, MODE: tl.constexpr, USE_PDL: tl.constexpr, w2_ptr=None, eps2=0.0,
                        EARLY: tl.constexpr = True):
        # MODE 0: y = norm(x); 1: ro = r + x, y = norm(ro); 2: y = r + norm(x); 3: y = r + x;
        # 4: ro = r + norm(x), y = norm2(ro)
        pdl_launch_dependents(USE_PDL)
        row = tl.program_id(0)
        d = tl.arange(0, BD)
        m = d < D
        # EARLY: the norm weights (written by no kernel) are loaded before waiting for the previous kernel, x
        # and the residual after it, both at once; otherwise (the form before session 11) everything after the
        # wait and MODE 2 / 4's residual only after the first reduction
        if EARLY and MODE != 3:
            w = tl.load(w_ptr + d, mask=m, other=0).to(tl.float32)
        if EARLY and MODE == 4:
            w2 = tl.load(w2_ptr + d, mask=m, other=0).to(tl.float32)
        pdl_wait(USE_PDL)
        x = tl.load(x_ptr + row * stride_x + d, mask=m, other=0).to(tl.float32)
        if MODE == 1 or MODE == 3 or (EARLY and MODE != 0):
            r = tl.load(r_ptr + row * stride_r + d, mask=m, other=0).to(tl.float32)
        if not EARLY and MODE != 3:
            w = tl.load(w_ptr + d, mask=m, other=0).to(tl.float32)
        if MODE == 3:
            tl.debug_barrier()
            tl.store(y_ptr + row * stride_y + d, (x + r).to(y_ptr.dtype.element_ty), mask=m)
        else:
            if MODE == 1:
                x = (x + r).to(ro_ptr.dtype.element_ty)
                tl.debug_barrier()  # outputs may alias inputs: all loads before any store
                tl.store(ro_ptr + row * stride_ro + d, x, mask=m)
                x = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
            y = x * rstd * w
            if MODE == 2 or MODE == 4:
                y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
                if not EARLY:
                    r = tl.load(r_ptr + row * stride_r + d, mask=m, other=0).to(tl.float32)
                y = y + r
                tl.debug_barrier()
            if MODE == 4:
                xn = y.to(ro_ptr.dtype.element_ty)
                tl.store(ro_ptr + row * stride_ro + d, xn, mask=m)
                xf = xn.to(tl.float32)
                if not EARLY:
                    w2 = tl.load(w2_ptr + d, mask=m, other=0).to(tl.float32)
                y = xf * (1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps2)) * w2
            tl.store(y_ptr + row * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=m)


# warps of a one-row (decode) launch; 0: the row-size rule of _launch (8 warps for the 7B's 3840)
DECODE_WARPS = 0
# the norm weights before the PDL wait and x with the residual at once after it (see _rmsnorm_kernel)
LOADS_EARLY = True


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        raise ValueError("rmsnorm kernels need a unit last stride")
    return t2


def _launch(x, residual, w, eps, y, ro, mode, w2=None, eps2=0.0):
    x2 = _rows(x)
    y2 = _rows(y)
    r2 = _rows(residual) if residual is not None else x2
    ro2 = _rows(ro) if ro is not None else y2
    if y2.data_ptr() != y.data_ptr() or (ro is not None and ro2.data_ptr() != ro.data_ptr()):
        raise ValueError("outputs must be views that reshape to rows without copying")
    n, d = x2.shape
    bd = next_pow2(d)
    nw = 4 if bd <= 1024 else 8 if bd <= 4096 else 16
    pdl = n == 1 and use_pdl(x2)  # decode rows only (one block: nothing to steal from a later wave)
    if n == 1 and DECODE_WARPS:
        nw = DECODE_WARPS
    _rmsnorm_kernel[(n,)](
        x2, r2, w, y2, ro2, d, float(eps),
        x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
        BD=bd, MODE=mode, USE_PDL=pdl, w2_ptr=w2, eps2=float(eps2), EARLY=LOADS_EARLY, num_warps=nw,
        **pdl_kwargs(pdl),
    )


def rmsnorm_triton(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, w, eps, out, None, 0)
    return out


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(residual) if residual_out is None else residual_out
    _launch(x, residual, w, eps, out, residual_out, 1)
    return out, residual_out


def rmsnorm_add_triton(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    out = torch.empty_like(residual) if out is None else out
    _launch(x, residual, w, eps, out, None, 2)
    return out


def rmsnorm_add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, w2: torch.Tensor,
                               eps2: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x)
    residual_out = torch.empty_like(residual)
    _launch(x, residual, w, eps, out, residual_out, 4, w2, eps2)
    return out, residual_out


def residual_add_triton(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(residual) if out is None else out
    _launch(x, residual, residual, 0.0, out, None, 3)  # the weight is not read
    return out


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def residual_add(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    fn = residual_add_triton if use_triton(x) else residual_add_ref
    return fn(x, residual, out)


def rmsnorm_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, w2: torch.Tensor,
                        eps2: float) -> tuple[torch.Tensor, torch.Tensor]:
    fn = rmsnorm_add_rmsnorm_triton if use_triton(x) else rmsnorm_add_rmsnorm_ref
    return fn(x, residual, w, eps, w2, eps2)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    fn = rmsnorm_triton if use_triton(x) else rmsnorm_ref
    return fn(x, w, eps, out)


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = add_rmsnorm_triton if use_triton(x) else add_rmsnorm_ref
    return fn(x, residual, w, eps, out, residual_out)


def rmsnorm_add(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    fn = rmsnorm_add_triton if use_triton(x) else rmsnorm_add_ref
    return fn(x, residual, w, eps, out)


def residual_norm(mode: str, y: torch.Tensor, residual: torch.Tensor, w: torch.Tensor | None = None, eps: float = 0.0,
                  residual_out: torch.Tensor | None = None, normed_out: torch.Tensor | None = None):
    """The op that takes a sublayer's output y into the residual stream, by mode: "add_rmsnorm" ->
    (normed, residual + y) (pre-norm layers), "rmsnorm_add" -> residual + rmsnorm(y) (post-norm layers),
    "add" -> residual + y. residual_out / normed_out: optional destinations."""
    if mode == "add_rmsnorm":
        return add_rmsnorm(y, residual, w, eps, out=normed_out, residual_out=residual_out)
    if mode == "rmsnorm_add":
        return rmsnorm_add(y, residual, w, eps, out=residual_out)
    if mode == "add":
        return residual_add(y, residual, out=residual_out)
    raise ValueError(f"unknown norm mode {mode!r}")
