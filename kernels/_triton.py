"""Shared plumbing for the kernels: optional triton import, backend choice, cached workspaces.

Triton is optional: without it (or on CPU tensors) every op runs its torch reference.
On CPU the Triton kernels run only in the interpreter, which must be chosen (TRITON_INTERPRET=1)
before triton is first imported; tests/conftest.py does that.

Backend choice, per call, in this order:
  1. `with backend("torch" | "triton" | "auto"):` (this module's context manager),
  2. the environment variable OLMO_LOCAL_KERNELS (same values, read at import),
  3. "auto": Triton for CUDA tensors when triton is importable, the torch reference otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:  # triton is optional: importing olmo_local.kernels must work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001  (a broken triton install must not break the CPU path)
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("OLMO_LOCAL_KERNELS", "auto").lower()
if _backend not in _BACKENDS:
    _backend = "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the kernel backend inside the block: "triton", "torch" or "auto"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {_BACKENDS}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def current_backend() -> str:
    return _backend


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor `t` should run its Triton kernel."""
    if _backend == "torch" or not HAS_TRITON:
        if _backend == "triton" and not HAS_TRITON:
            raise RuntimeError("kernel backend 'triton' was forced but triton is not installed")
        return False
    if _backend == "triton":
        if not t.is_cuda and not INTERPRET:
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        return True
    return t.is_cuda


# Programmatic dependent launch (Hopper+): a kernel launched with it may start while the previous
# kernel of the stream is still running; it waits (griddepcontrol.wait) before touching anything the
# previous kernel writes or reads, and lets its own successor launch early (launch_dependents). The
# decode kernels use it so that the next kernel's blocks fill the SMs the previous one leaves idle at
# its tail and can start on data that no kernel writes (weights) before the wait.
# OLMO_LOCAL_PDL=0 turns it off.
_PDL_ENV = os.environ.get("OLMO_LOCAL_PDL", "1") != "0"
_PDL_OK: dict[int, bool] = {}


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on tensor ``t`` are launched with programmatic dependent launch."""
    if not (_PDL_ENV and HAS_TRITON and not INTERPRET and t.is_cuda):
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        try:
            from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

            _PDL_OK[idx] = capability(t.device)[0] >= 9
        except Exception:  # noqa: BLE001  (older Triton: no PDL)
            _PDL_OK[idx] = False
    return _PDL_OK[idx]


def pdl_kwargs(on: bool) -> dict:
    """Extra launch arguments: launch_pdl only when used (older Triton does not know it)."""
    return {"launch_pdl": True} if on else {}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 8 for CPU / the interpreter)."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device; CPU / the interpreter counts as Hopper (9, 0), the tuned default."""
    if device.type != "cuda":
        return (9, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def workspace(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A persistent scratch buffer, allocated once per (tag, shape, dtype, device) and then reused.

    Counters (int32) are zero-filled at creation; kernels that use them leave them at zero when they
    finish, so a buffer can be reused by later launches and by CUDA-graph replays. Call each op once
    before capturing a graph so that its workspace exists outside the capture.
    Kernels on one stream run in order, so sharing a workspace between ops of one step is safe.
    """
    key = (tag, tuple(shape), dtype, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None:
        buf = torch.zeros(shape, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf


if HAS_TRITON:

    @triton.jit
    def pdl_wait(ON: tl.constexpr):
        """Wait for the previous kernel of the stream (programmatic dependent launch); no-op when off."""
        if ON:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch_dependents(ON: tl.constexpr):
        """Let the next kernel of the stream launch now (it waits in pdl_wait before using our data)."""
        if ON:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def emit_rows(y_ptr, part_ptr, ra, rb, t: tl.constexpr, pid_k, rn, rmask, NR, stride_y,
                  T: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
        """Row t of a GEMV result (ra; rb the matching up rows when gated): stored (one split, with
        silu(ra) * rb when gated) or written as this split's fp32 partial for splitk_finish."""
        if not SPLIT_K:
            if GATED:
                ra = ra / (1.0 + tl.exp(-ra)) * rb
            tl.store(y_ptr + t * stride_y + rn, ra.to(y_ptr.dtype.element_ty), mask=rmask)
        else:
            if GATED:
                ntot = 2 * NR
            else:
                ntot = NR
            base = part_ptr + (pid_k * T + t) * ntot + rn
            tl.store(base, ra, mask=rmask)
            if GATED:
                tl.store(base + NR, rb, mask=rmask)

    @triton.jit
    def fold_store(y, rn, rmask, pid_n, xn_ptr, res_ptr, fw_ptr, xt_ptr, ss_ptr, FOLD: tl.constexpr,
                   r_pre=None, w_pre=None, PRE: tl.constexpr = False):
        """A producer GEMV's rows y (fp32) taken into the residual stream instead of stored (FOLD 1:
        x_new = residual + y; FOLD 2: also x~ = x_new * w and this row block's sum of x_new^2, so that
        the consumer GEMV computes rmsnorm(x_new) * w @ W.T as rstd * (x~ @ W.T) with rstd from the
        blocks' sums: the pre-norm with no launch and no full-row step). y is rounded to xn's dtype
        first, as the separate GEMV output was; x_new is rounded to it before x~ and the sum. PRE: the
        residual rows (r_pre) and the norm weight (w_pre) were loaded by the caller at its start, so the
        last program's chain after the split-K atomic has no loads but the partials."""
        ty = xn_ptr.dtype.element_ty
        if PRE:
            r = r_pre.to(tl.float32)
        else:
            r = tl.load(res_ptr + rn, mask=rmask, other=0).to(tl.float32)
        xn = (r + y.to(ty).to(tl.float32)).to(ty)
        tl.store(xn_ptr + rn, xn, mask=rmask)
        if FOLD == 2:
            xf = xn.to(tl.float32)
            if PRE:
                w = w_pre.to(tl.float32)
            else:
                w = tl.load(fw_ptr + rn, mask=rmask, other=0).to(tl.float32)
            tl.store(xt_ptr + rn, (xf * w).to(xt_ptr.dtype.element_ty), mask=rmask)
            tl.store(ss_ptr + pid_n, tl.sum(tl.where(rmask, xf * xf, 0.0), axis=0))

    @triton.jit
    def fold_rstd(rss_ptr, NSS, NSSP: tl.constexpr, K, eps):
        """The consumer side of a folded norm: rsqrt(sum of the producer's NSS row-block sums of squares / K
        + eps) (see fold_store)."""
        jss = tl.arange(0, NSSP)
        return 1.0 / tl.sqrt(tl.sum(tl.load(rss_ptr + jss, mask=jss < NSS, other=0.0), axis=0) / K + eps)

    @triton.jit
    def conv_load(rn, rmask, cw_ptr, cs_ptr, NCONV, KC: tl.constexpr, KP: tl.constexpr):
        """A short causal conv's operands for the output rows rn that are conv channels (rn < NCONV): the
        weights [BN, KP] (tap KC - 1 multiplies the current input), the state's K-1 old inputs in columns
        0..K-2 and the next state's old part (the state shifted by one)."""
        jj = tl.arange(0, KP)[None, :]
        cm = (rmask & (rn < NCONV))[:, None]
        w = tl.load(cw_ptr + rn[:, None] * KC + jj, mask=cm & (jj < KC), other=0).to(tl.float32)
        old = tl.load(cs_ptr + rn[:, None] * (KC - 1) + jj, mask=cm & (jj < KC - 1), other=0).to(tl.float32)
        nxt = tl.load(cs_ptr + rn[:, None] * (KC - 1) + jj + 1, mask=cm & (jj + 1 < KC - 1), other=0).to(tl.float32)
        return w, old, nxt

    @triton.jit
    def conv_rows(y, rn, rmask, w, old, nxt, cs_ptr, act_ptr, NCONV, KC: tl.constexpr, KP: tl.constexpr):
        """The conv channels among rows rn (y: their projection outputs, fp32 of the model-dtype values):
        act = silu(conv over [old K-1 inputs, y]) in fp32, and the state shifted to end with y."""
        jj = tl.arange(0, KP)[None, :]
        cm = rmask & (rn < NCONV)
        win = tl.where(jj == KC - 1, y[:, None], old)
        acc = tl.sum(win * w, axis=1)
        tl.store(act_ptr + rn, acc / (1.0 + tl.exp(-acc)), mask=cm)
        nxt = tl.where(jj == KC - 2, y[:, None], nxt)
        tl.store(cs_ptr + rn[:, None] * (KC - 1) + jj, nxt.to(cs_ptr.dtype.element_ty), mask=cm[:, None] & (jj < KC - 1))

    @triton.jit
    def splitk_finish(y_ptr, part_ptr, cnt_ptr, pid_n, rn, rmask, NR, stride_y,
                      T: tl.constexpr, BN: tl.constexpr, SPLIT, GATED: tl.constexpr, SPLITP: tl.constexpr = 0,
                      rscale=1.0, FOLD: tl.constexpr = 0, res_ptr=None, fw_ptr=None, xt_ptr=None, ss_ptr=None,
                      r_pre=None, w_pre=None, PRE: tl.constexpr = False,
                      CONV: tl.constexpr = False, cw_ptr=None, cs_ptr=None, act_ptr=None, NCONV=0,
                      KC: tl.constexpr = 4, KP: tl.constexpr = 4,
                      RSUM: tl.constexpr = False, rsum_ptr=None, NQS=0, NKS=0):
        """Split-K epilogue shared by the GEMV kernels. Each split has written its fp32 partial rows
        part[split, t, :]; the last program of the row block to arrive (self-resetting counter) adds
        them (deterministic: split order, or with SPLITP >= SPLIT one [SPLITP, BN] load and a fixed
        reduction tree, all partials in flight at once instead of a chain of loads), applies
        silu(gate) * up when gated, stores the rows (scaled by rscale first, before the SiLU; or with FOLD,
        taken into the residual stream by fold_store, T = 1; PRE: with the residual and weight rows the
        caller preloaded). Ordering as in CUTLASS's serial split-K semaphore:
        CTA barrier, then one gpu-scope acq_rel atomic; the reader's loads bypass L1. CONV (T = 1, not
        gated): the rows below NCONV also go through conv_rows (their operands loaded by every program
        before the atomic, so the last one's tail has no loads but the partials). RSUM (T = 1, not gated, no
        FOLD): the block's sums of squares of its stored rows below NQS and of those in [NQS, NQS + NKS) go to
        rsum[2 pid_n], rsum[2 pid_n + 1] (attention's q/k norms, whole-row, finished by their reader).
        Returns whether this program was that last one."""
        if GATED:
            ntot = 2 * NR
        else:
            ntot = NR
        if CONV:
            c_w, c_old, c_nxt = conv_load(rn, rmask, cw_ptr, cs_ptr, NCONV, KC, KP)
        tl.debug_barrier()  # all of this program's partial stores happen before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel, gpu scope
        if done == SPLIT - 1:
            for t in tl.static_range(T):
                if SPLITP > 0:
                    sj = tl.arange(0, SPLITP)[:, None]
                    base = part_ptr + (sj * T + t) * ntot + rn[None, :]
                    m2 = (sj < SPLIT) & rmask[None, :]
                    ra = tl.sum(tl.load(base, mask=m2, other=0.0, cache_modifier=".cg"), axis=0)
                    rb = ra
                    if GATED:
                        rb = tl.sum(tl.load(base + NR, mask=m2, other=0.0, cache_modifier=".cg"), axis=0)
                else:
                    ra = tl.zeros([BN], dtype=tl.float32)
                    rb = tl.zeros([BN], dtype=tl.float32)
                    for s in range(SPLIT):
                        base = part_ptr + (s * T + t) * ntot + rn
                        ra += tl.load(base, mask=rmask, other=0.0, cache_modifier=".cg")
                        if GATED:
                            rb += tl.load(base + NR, mask=rmask, other=0.0, cache_modifier=".cg")
                ra = ra * rscale
                rb = rb * rscale
                if GATED:
                    ra = ra / (1.0 + tl.exp(-ra)) * rb
                if FOLD > 0:
                    fold_store(ra, rn, rmask, pid_n, y_ptr, res_ptr, fw_ptr, xt_ptr, ss_ptr, FOLD, r_pre, w_pre, PRE)
                else:
                    yv = ra.to(y_ptr.dtype.element_ty)
                    tl.store(y_ptr + t * stride_y + rn, yv, mask=rmask)
                    if CONV:
                        conv_rows(yv.to(tl.float32), rn, rmask, c_w, c_old, c_nxt, cs_ptr, act_ptr, NCONV, KC, KP)
                    if RSUM:
                        yf = yv.to(tl.float32)
                        yf = tl.where(rmask, yf * yf, 0.0)
                        tl.store(rsum_ptr + 2 * pid_n, tl.sum(tl.where(rn < NQS, yf, 0.0), axis=0))
                        tl.store(rsum_ptr + 2 * pid_n + 1,
                                 tl.sum(tl.where((rn >= NQS) & (rn < NQS + NKS), yf, 0.0), axis=0))
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
        return done == SPLIT - 1
