"""One-launch token sampling for the decode graph: temperature, top-p, min-p and the draw.

    sample_triton(logits, temperature, top_p, min_p, rng, out_id, out_token) -> None (ids on the device)
    sample_ref(logits, temperature, top_p, min_p, u) -> (id, probs)

The draw is the exponential race of DecodeStep: argmax_i p_i / E_i with E_i = -log U_i, U_i uniform,
which picks i with probability p_i. U_i comes from Philox (tl.randint) keyed by the seed and a step
counter kept on the device (rng = int64 [seed, step]; the kernel advances step), so a CUDA graph
replays a fresh draw each time and a seed repeats a reply; U_i = (24 random bits + 0.5) / 2^24 is never
0 or 1, so every E_i is finite and positive.

Why a kernel: the torch form (generate.sampling_probs, then the race) sorts all ~100K logits for top-p
and runs ~15 small kernels. The H200 measured 278 µs per token over greedy for the chat's default
(T 0.6, top-p 0.95). Here top-p needs no sort:
  - p_i = softmax(x / T). Token i is kept iff the mass of the tokens above it, G(p_i) = sum_{p_j > p_i} p_j,
    is <= top_p. This is the sorted form's rule (cumsum - p <= top_p), ties aside.
  - G is non-increasing, so the kept set is {p_i >= t0} with t0 = min{t : sum_{p_j > t} p_j <= top_p}. t0
    is found by bisection on the float bits of p (31 steps; p >= 0, so bits order as values).
  - A token with p_i < (1 - top_p) / N is never kept: all tokens at or below it hold less than 1 - top_p.
    So the bisection runs on the candidates p_i >= tau = (1 - top_p) / (2 N), compacted into a buffer of
    C slots. This is the fast path whenever the distribution is not flat. With more than C candidates the
    same bisection walks all N logits (slow path, exact).
  - min-p on the renormalised probabilities is p_i >= min_p * max p, i.e. exp(x_i / T - max) >= min_p.
top-k is not handled here (DecodeStep keeps the torch form when top_k > 0).
One program of NUM_WARPS warps walks the logits in chunks of BC. The candidates live in a scratch buffer
(workspace "sample_cand"); with DEBUG the kernel also writes its final probabilities and U for tests.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, tl, triton, workspace

__all__ = ["sample_ref", "sample_triton", "sample_fits"]

CANDIDATES = 8192  # fast-path slots (C)
CHUNK = 4096  # logits per chunk (BC)
NUM_WARPS = 16


def sample_ref(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, u: torch.Tensor
               ) -> tuple[int, torch.Tensor]:
    """(id, probs): generate.sampling_probs (the host Sampler's math, sorted top-p) and the race with the
    uniforms u (E = -log u); ids with probability 0 never win."""
    from olmo_local.generate import SamplingParams, sampling_probs

    probs = sampling_probs(logits.float(), SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p))
    score = (probs / -torch.log(u.double()).float()).masked_fill(probs == 0, -1.0)
    return int(torch.argmax(score)), probs


if HAS_TRITON:

    @triton.jit
    def _uniform(seed, idx):
        """U in (0, 1) from Philox keyed by seed at counter idx: 24 bits + 0.5, over 2^24."""
        r = tl.randint(seed, idx)
        return (((r >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

    @triton.jit
    def _chunk_p(lg_ptr, c, N, temp, m, z, BC: tl.constexpr):
        i = c + tl.arange(0, BC)
        msk = i < N
        x = tl.load(lg_ptr + i, mask=msk, other=float("-inf")).to(tl.float32) / temp
        return i, msk, tl.exp(x - m) / z

    @triton.jit
    def _sample_kernel(lg_ptr, N, temp, top_p, min_p, tau, rng_ptr, id_ptr, tok_ptr, cp_ptr, ci_ptr,
                       dp_ptr, du_ptr, BC: tl.constexpr, C: tl.constexpr, TOPP: tl.constexpr,
                       MINP: tl.constexpr, DEBUG: tl.constexpr):
        seed = tl.load(rng_ptr) + tl.load(rng_ptr + 1) * 1000003  # this step's key
        # 1: max and sum of exp(x / T - max), online over the chunks
        m = tl.max(tl.full([BC], float("-inf"), tl.float32), 0)
        z = tl.sum(tl.zeros([BC], tl.float32), 0)
        for c in range(0, N, BC):
            i = c + tl.arange(0, BC)
            x = tl.load(lg_ptr + i, mask=i < N, other=float("-inf")).to(tl.float32) / temp
            nm = tl.maximum(m, tl.max(x, 0))
            z = z * tl.exp(m - nm) + tl.sum(tl.exp(x - nm), 0)
            m = nm
        pmin = min_p / z  # min-p: p_i >= min_p * max p, max p = 1 / z
        best = tl.max(tl.full([BC], -2.0, tl.float32), 0)
        bid = tl.sum(tl.zeros([BC], tl.int32), 0)
        if TOPP:
            # 2: candidates p_i >= tau (a superset of the kept set), compacted in index order
            n_c = tl.sum(tl.zeros([BC], tl.int32), 0)
            for c in range(0, N, BC):
                i, msk, p = _chunk_p(lg_ptr, c, N, temp, m, z, BC)
                cm = msk & (p >= tau)
                pos = n_c + tl.cumsum(cm.to(tl.int32), 0) - 1
                st = cm & (pos < C)
                tl.store(cp_ptr + pos, p, mask=st)
                tl.store(ci_ptr + pos, i, mask=st)
                n_c += tl.sum(cm.to(tl.int32), 0)
            tl.debug_barrier()  # the candidates are read back by other threads of this program
            if n_c <= C:  # fast path: bisection and draw on the candidates
                j = tl.arange(0, C)
                jm = j < n_c
                p = tl.load(cp_ptr + j, mask=jm, other=0.0)
                idx = tl.load(ci_ptr + j, mask=jm, other=0)
                bits = p.to(tl.int32, bitcast=True)
                lo = tl.min(bits, 0) * 0
                hi = tl.max(bits, 0)
                for _ in range(31):
                    mid = lo + (hi - lo) // 2
                    ok = tl.sum(tl.where(bits > mid, p, 0.0), 0) <= top_p
                    hi = tl.where(ok, mid, hi)
                    lo = tl.where(ok, lo, mid + 1)
                keep = jm & (bits >= lo)
                if MINP:
                    keep = keep & (p >= pmin)
                score = tl.where(keep, p / -tl.log(_uniform(seed, idx)), -1.0)
                best = tl.max(score, 0)
                bid = tl.sum(tl.where(j == tl.argmax(score, 0), idx, 0), 0)
                if DEBUG:
                    zk = tl.sum(tl.where(jm & (bits >= lo), p, 0.0), 0)
                    tl.store(dp_ptr + idx, tl.where(keep, p / zk, 0.0), mask=jm)
            else:  # slow path (a flat distribution): the same bisection over all logits
                lo = n_c * 0
                hi = tl.max(tl.full([BC], 1.0, tl.float32), 0).to(tl.int32, bitcast=True)  # bits of 1.0
                for _ in range(31):
                    mid = lo + (hi - lo) // 2
                    f = tl.sum(tl.zeros([BC], tl.float32), 0)
                    for c in range(0, N, BC):
                        i, msk, p = _chunk_p(lg_ptr, c, N, temp, m, z, BC)
                        f += tl.sum(tl.where(msk & (p.to(tl.int32, bitcast=True) > mid), p, 0.0), 0)
                    ok = f <= top_p
                    hi = tl.where(ok, mid, hi)
                    lo = tl.where(ok, lo, mid + 1)
                zk = tl.sum(tl.zeros([BC], tl.float32), 0)
                for c in range(0, N, BC):
                    i, msk, p = _chunk_p(lg_ptr, c, N, temp, m, z, BC)
                    keep = msk & (p.to(tl.int32, bitcast=True) >= lo)
                    zk += tl.sum(tl.where(keep, p, 0.0), 0)
                    if MINP:
                        keep = keep & (p >= pmin)
                    score = tl.where(keep, p / -tl.log(_uniform(seed, i)), -1.0)
                    cb = tl.max(score, 0)
                    ci = c + tl.argmax(score, 0)
                    bid = tl.where(cb > best, ci, bid)
                    best = tl.maximum(best, cb)
                if DEBUG:
                    for c in range(0, N, BC):
                        i, msk, p = _chunk_p(lg_ptr, c, N, temp, m, z, BC)
                        keep = msk & (p.to(tl.int32, bitcast=True) >= lo)
                        if MINP:
                            keep = keep & (p >= pmin)
                        tl.store(dp_ptr + i, tl.where(keep, p / zk, 0.0), mask=msk)
        else:  # no top-p: the race over all tokens
            for c in range(0, N, BC):
                i, msk, p = _chunk_p(lg_ptr, c, N, temp, m, z, BC)
                keep = msk & (p > 0.0)
                if MINP:
                    keep = keep & (p >= pmin)
                score = tl.where(keep, p / -tl.log(_uniform(seed, i)), -1.0)
                cb = tl.max(score, 0)
                ci = c + tl.argmax(score, 0)
                bid = tl.where(cb > best, ci, bid)
                best = tl.maximum(best, cb)
                if DEBUG:
                    tl.store(dp_ptr + i, tl.where(keep, p, 0.0), mask=msk)
        if DEBUG:
            for c in range(0, N, BC):
                i = c + tl.arange(0, BC)
                tl.store(du_ptr + i, _uniform(seed, i), mask=i < N)
        tl.store(id_ptr, bid.to(tl.int64))
        tl.store(tok_ptr, bid.to(tl.int64))
        tl.store(rng_ptr + 1, tl.load(rng_ptr + 1) + 1)


def sample_fits(logits: torch.Tensor, top_k: int) -> bool:
    """Whether sample_triton takes this draw: Triton, a 1-D logits vector, no top-k."""
    return HAS_TRITON and logits.dim() == 1 and top_k == 0


def sample_triton(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, rng: torch.Tensor,
                  out_id: torch.Tensor, out_token: torch.Tensor, *, debug: tuple | None = None,
                  candidates: int | None = None) -> None:
    """Draw one id from logits [N] (any float dtype; ids >= N are not considered) and write it to
    out_id and out_token (int64 [1]); rng is int64 [2] = (seed, step) on the same device, step advanced.
    debug = (probs [N] fp32 zeros, u [N] fp32) receives the kernel's final probabilities and uniforms.
    Capturable in a CUDA graph (one launch; its scratch buffer is allocated on the first call)."""
    n = logits.numel()
    c = next_pow2(candidates or CANDIDATES)
    cand_p = workspace("sample_cand_p", (c,), torch.float32, logits.device)
    cand_i = workspace("sample_cand_i", (c,), torch.int32, logits.device)
    dp, du = debug if debug is not None else (cand_p, cand_p)
    topp = top_p < 1.0
    _sample_kernel[(1,)](
        logits, n, float(temperature), float(top_p), float(min_p), 0.5 * (1.0 - top_p) / n if topp else 0.0,
        rng, out_id, out_token, cand_p, cand_i, dp, du,
        BC=min(CHUNK, next_pow2(n)), C=c, TOPP=topp, MINP=min_p > 0.0, DEBUG=debug is not None,
        num_warps=NUM_WARPS,
    )
