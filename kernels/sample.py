"""Token sampling for the decode graph in a few launches: temperature, top-p, min-p and the draw.

    sample_triton(logits, temperature, top_p, min_p, rng, out_id, out_token) -> None (ids on the device)
    sample_ref(logits, temperature, top_p, min_p, u) -> (id, probs)

The draw is the exponential race of DecodeStep: argmax_i p_i / E_i with E_i = -log U_i, U_i uniform,
which picks i with probability p_i. U_i comes from Philox (tl.randint), keyed by the seed and a step
counter kept on the device (rng = int64 [seed, step]; the last launch advances step). So a CUDA graph
replays a fresh draw each time and a seed repeats a reply. U_i = (23 random bits + 0.5) / 2^23 is never
0 or 1 in fp32, so every E_i is finite and positive.

Why: the torch form (generate.sampling_probs, then the race, with the noise drawn by the host before
each replay) sorts all ~100K logits for top-p and runs ~15 small kernels. The H200 measured 64 µs per
draw at T 0.7 and 179 µs at T 0.6 with top-p 0.95. A first version of this kernel ran as one program
walking the logits chunk by chunk and was latency-bound (103 / 140 µs, and ~700 µs on flat logits), so
every step here is spread over ceil(N / BLOCK) programs:
  1  every program: the max and sum of exp(x / T - max) of its block -> partials; program 0 zeroes the
     histograms
  2  (top-p only) four radix levels over the float bits of p = softmax(x / T). Token i is kept iff the
     mass above it, G(p_i) = sum_{p_j > p_i} p_j, is <= top_p; that is the sorted form's rule
     (cumsum - p <= top_p), except for ties: tokens with exactly the threshold's p are all kept, where
     the sort keeps an arbitrary part of them (bf16 logits tie often). G is non-increasing, so the kept set is {bits(p_i) >= t0} with
     t0 = min{t : sum_{bits_j > t} p_j <= top_p}. Level k adds each candidate's p, in fixed point
     (2^40; integer atomics, so the sums do not depend on the order), into 256 bins by its k-th byte of
     bits, among the tokens whose higher bytes match the prefix found so far. Every program re-derives
     that prefix from the finished levels' histograms (a few 256-wide ops). Candidates are the tokens
     with p_i >= (1 - top_p) / (2N). A token below (1 - top_p) / N is never kept: all tokens at or below
     it hold less than 1 - top_p.
  3  every program: the race over its block's kept tokens (min-p: p_i >= min_p * max p) -> partial best
  4  one program: the best of the partials -> out_id, out_token; the step counter advances.
Launches: 3 without top-p, 7 with it, chained with programmatic dependent launch on Hopper.
top-k is not handled here (DecodeStep keeps the torch form when top_k > 0).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, pdl_kwargs, tl, triton, use_pdl, workspace

__all__ = ["greedy_fits", "greedy_triton", "sample_fits", "sample_ref", "sample_triton"]

BLOCK = 1024  # logits per program
FIXED = float(2 ** 40)  # fixed-point scale of the top-p histograms


def sample_ref(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, u: torch.Tensor
               ) -> tuple[int, torch.Tensor]:
    """(id, probs): generate.sampling_probs (the host Sampler's math, sorted top-p) and the race with the
    uniforms u (E = -log u); ids with probability 0 never win."""
    from olmo_local.generate import SamplingParams, sampling_probs

    probs = sampling_probs(logits.float(), SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p))
    score = (probs / -torch.log(u.double()).float()).masked_fill(probs == 0, -1.0)
    return int(torch.argmax(score)), probs


if HAS_TRITON:
    from ._triton import pdl_launch_dependents, pdl_wait

    @triton.jit
    def _uniform(seed, idx):
        """U in (0, 1) from Philox keyed by seed at counter idx: 23 bits + 0.5, over 2^23. (With 24 bits
        the top value + 0.5 rounds to 2^24 in fp32, U = 1, E = 0, and that token would always win.)"""
        r = tl.randint(seed, idx)
        return (((r >> 9) & 0x7FFFFF).to(tl.float32) + 0.5) * (1.0 / 8388608.0)

    @triton.jit
    def _block_p(lg_ptr, pm_ptr, ps_ptr, N, temp, NB, BS: tl.constexpr, NBP: tl.constexpr):
        """This program's indices, mask, p = softmax(x / T) and the global (max, sum) from the partials."""
        i = tl.program_id(0) * BS + tl.arange(0, BS)
        msk = i < N
        b = tl.arange(0, NBP)
        pm = tl.load(pm_ptr + b, mask=b < NB, other=float("-inf"))
        m = tl.max(pm, 0)
        z = tl.sum(tl.load(ps_ptr + b, mask=b < NB, other=0.0) * tl.exp(pm - m), 0)
        x = tl.load(lg_ptr + i, mask=msk, other=float("-inf")).to(tl.float32) / temp
        return i, msk, tl.exp(x - m) / z, z

    @triton.jit
    def _prefix(h_ptr, LEVELS: tl.constexpr, TP):
        """(prefix of the threshold's bytes, fixed-point mass above the prefix's range, mass inside it)
        after LEVELS finished histograms: at each level the smallest byte d whose mass above stays
        <= top_p. After all four levels the prefix is t0 and above + inside is the kept mass."""
        d = tl.arange(0, 256)
        pre = tl.sum(d * 0, 0)
        above = tl.sum(d.to(tl.int64) * 0, 0)
        inside = above
        for k in tl.static_range(LEVELS):
            h = tl.load(h_ptr + k * 256 + d)
            s = tl.sum(h, 0) - tl.cumsum(h, 0)  # mass in bytes above d
            dk = tl.min(tl.where(above + s <= TP, d, 255), 0)
            above += tl.sum(tl.where(d == dk, s, 0), 0)
            inside = tl.sum(tl.where(d == dk, h, 0), 0)
            pre = pre * 256 + dk
        return pre, above, inside

    @triton.jit
    def _sample_stats(lg_ptr, pm_ptr, ps_ptr, h_ptr, N, temp, BS: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        pid = tl.program_id(0)
        i = pid * BS + tl.arange(0, BS)
        x = tl.load(lg_ptr + i, mask=i < N, other=float("-inf")).to(tl.float32) / temp
        m = tl.max(x, 0)
        tl.store(pm_ptr + pid, m)
        tl.store(ps_ptr + pid, tl.sum(tl.exp(x - m), 0))
        if pid == 0:
            for k in tl.static_range(4):
                tl.store(h_ptr + k * 256 + tl.arange(0, 256), tl.zeros([256], tl.int64))

    @triton.jit
    def _sample_hist(lg_ptr, pm_ptr, ps_ptr, h_ptr, N, temp, NB, tau, TP, BS: tl.constexpr, NBP: tl.constexpr,
                     LEVEL: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        i, msk, p, z = _block_p(lg_ptr, pm_ptr, ps_ptr, N, temp, NB, BS, NBP)
        bits = p.to(tl.int32, bitcast=True)
        on = msk & (p >= tau)
        if LEVEL > 0:
            pre, _above, _inside = _prefix(h_ptr, LEVEL, TP)
            on = on & ((bits >> (32 - 8 * LEVEL)) == pre)
        dig = (bits >> (24 - 8 * LEVEL)) & 0xFF
        tl.atomic_add(h_ptr + LEVEL * 256 + dig, (p * 1099511627776.0).to(tl.int64), mask=on, sem="relaxed")

    @triton.jit
    def _sample_race(lg_ptr, pm_ptr, ps_ptr, h_ptr, rng_ptr, bs_ptr, bi_ptr, N, temp, NB, tau, TP, min_p,
                     BS: tl.constexpr, NBP: tl.constexpr, TOPP: tl.constexpr, MINP: tl.constexpr,
                     dp_ptr, du_ptr, DEBUG: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        i, msk, p, z = _block_p(lg_ptr, pm_ptr, ps_ptr, N, temp, NB, BS, NBP)
        keep = msk & (p > 0.0)
        zk = 1.0
        if TOPP:
            t0, above, inside = _prefix(h_ptr, 4, TP)
            keep = keep & (p >= tau) & (p.to(tl.int32, bitcast=True) >= t0)
            zk = (above + inside).to(tl.float32) * (1.0 / 1099511627776.0)  # kept mass (DEBUG's probabilities)
        if MINP:
            keep = keep & (p >= min_p / z)  # min_p * max p, max p = 1 / z
        seed = tl.load(rng_ptr) + tl.load(rng_ptr + 1) * 1000003  # this step's key
        u = _uniform(seed, i)
        score = tl.where(keep, p / -tl.log(u), -1.0)
        tl.store(bs_ptr + tl.program_id(0), tl.max(score, 0))
        tl.store(bi_ptr + tl.program_id(0), tl.program_id(0) * BS + tl.argmax(score, 0))
        if DEBUG:
            tl.store(dp_ptr + i, tl.where(keep, p / zk, 0.0), mask=msk)
            tl.store(du_ptr + i, u, mask=msk)

    @triton.jit
    def _sample_pick(bs_ptr, bi_ptr, rng_ptr, id_ptr, tok_ptr, NB, NBP: tl.constexpr, USE_PDL: tl.constexpr,
                     pos_ptr=None, ADVANCE: tl.constexpr = False):
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        b = tl.arange(0, NBP)
        s = tl.load(bs_ptr + b, mask=b < NB, other=-3.0)
        best = tl.sum(tl.where(b == tl.argmax(s, 0), tl.load(bi_ptr + b, mask=b < NB, other=0), 0), 0)
        tl.store(id_ptr, best.to(tl.int64))
        tl.store(tok_ptr, best.to(tl.int64))
        tl.store(rng_ptr + 1, tl.load(rng_ptr + 1) + 1)
        if ADVANCE:  # the decode step's position, after every kernel of the step has read it
            tl.store(pos_ptr, tl.load(pos_ptr) + 1)


    @triton.jit
    def _greedy_kernel(lg_ptr, bs_ptr, bi_ptr, cnt_ptr, id_ptr, tok_ptr, N, NB, BS: tl.constexpr, NBP: tl.constexpr,
                       USE_PDL: tl.constexpr, pos_ptr=None, ADVANCE: tl.constexpr = False):
        """Every program: the max of its block of logits and its first index; the last program to arrive
        (self-resetting counter) takes the first block holding the overall max, so the id is the first
        index of the max, as torch.argmax."""
        pdl_launch_dependents(USE_PDL)
        pdl_wait(USE_PDL)
        pid = tl.program_id(0)
        i = pid * BS + tl.arange(0, BS)
        x = tl.load(lg_ptr + i, mask=i < N, other=float("-inf")).to(tl.float32)
        tl.store(bs_ptr + pid, tl.max(x, 0))
        tl.store(bi_ptr + pid, pid * BS + tl.argmax(x, 0))
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1) == NB - 1:  # acq_rel: every block's partial is visible
            b = tl.arange(0, NBP)
            s = tl.load(bs_ptr + b, mask=b < NB, other=float("-inf"), cache_modifier=".cg")
            bi = tl.load(bi_ptr + b, mask=b < NB, other=0, cache_modifier=".cg")
            best = tl.sum(tl.where(b == tl.argmax(s, 0), bi, 0), 0)
            tl.store(id_ptr, best.to(tl.int64))
            tl.store(tok_ptr, best.to(tl.int64))
            if ADVANCE:  # the decode step's position, after every kernel of the step has read it
                tl.store(pos_ptr, tl.load(pos_ptr) + 1)
            tl.atomic_xchg(cnt_ptr, 0)


GREEDY_BLOCK = 4096  # logits per program of greedy_triton


def greedy_fits(logits: torch.Tensor) -> bool:
    """Whether greedy_triton takes this argmax: Triton and a 1-D logits vector."""
    return HAS_TRITON and logits.dim() == 1


def greedy_triton(logits: torch.Tensor, out_id: torch.Tensor, out_token: torch.Tensor, *,
                  block: int | None = None, pos: torch.Tensor | None = None) -> None:
    """argmax of logits [N] (first index of the max, as torch.argmax) written to out_id and out_token (int64
    [1]) in one launch (PDL-chained after the lm_head on Hopper), instead of torch's argmax and a copy;
    with ``pos`` (int32 [1], the decode position) it also adds 1 to pos, so that the step needs no
    separate launch for that. CUDA-graph capturable (scratch allocated on first use)."""
    n = logits.numel()
    bs = block or GREEDY_BLOCK
    nb = cdiv(n, bs)
    dev = logits.device
    best_s = workspace("greedy_bs", (nb,), torch.float32, dev)
    best_i = workspace("greedy_bi", (nb,), torch.int32, dev)
    cnt = workspace("greedy_cnt", (1,), torch.int32, dev)
    pdl = use_pdl(logits)
    _greedy_kernel[(nb,)](logits, best_s, best_i, cnt, out_id, out_token, n, nb, BS=bs, NBP=max(2, next_pow2(nb)),
                          USE_PDL=pdl, pos_ptr=pos, ADVANCE=pos is not None, num_warps=4, **pdl_kwargs(pdl))


def sample_fits(logits: torch.Tensor, top_k: int) -> bool:
    """Whether sample_triton takes this draw: Triton, a 1-D logits vector, no top-k."""
    return HAS_TRITON and logits.dim() == 1 and top_k == 0


def sample_triton(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, rng: torch.Tensor,
                  out_id: torch.Tensor, out_token: torch.Tensor, *, debug: tuple | None = None,
                  block: int | None = None, pos: torch.Tensor | None = None) -> None:
    """Draw one id from logits [N] (any float dtype) and write it to out_id and out_token (int64 [1]);
    rng is int64 [2] = (seed, step) on the same device, step advanced; with ``pos`` (int32 [1], the decode
    position) the last launch also adds 1 to it. debug = (probs [N] fp32 zeros, u [N]
    fp32) receives the final probabilities (renormalised after top-p, zeros after min-p, as
    generate.sampling_probs) and the uniforms. CUDA-graph capturable (scratch allocated on first use)."""
    n = logits.numel()
    bs = block or BLOCK
    nb = cdiv(n, bs)
    nbp = max(2, next_pow2(nb))
    dev = logits.device
    pm = workspace("sample_pm", (nb,), torch.float32, dev)
    ps = workspace("sample_ps", (nb,), torch.float32, dev)
    hist = workspace("sample_hist", (4 * 256,), torch.int64, dev)
    best_s = workspace("sample_bs", (nb,), torch.float32, dev)
    best_i = workspace("sample_bi", (nb,), torch.int32, dev)
    dp, du = debug if debug is not None else (best_s, best_s)
    topp = top_p < 1.0
    tau = 0.5 * (1.0 - top_p) / n if topp else 0.0
    tp = int(top_p * FIXED)
    pdl = use_pdl(logits)
    kw = dict(num_warps=4, **pdl_kwargs(pdl))
    t = float(temperature)
    _sample_stats[(nb,)](logits, pm, ps, hist, n, t, BS=bs, USE_PDL=pdl, **kw)
    if topp:
        for level in range(4):
            _sample_hist[(nb,)](logits, pm, ps, hist, n, t, nb, tau, tp, BS=bs, NBP=nbp, LEVEL=level,
                                USE_PDL=pdl, **kw)
    _sample_race[(nb,)](logits, pm, ps, hist, rng, best_s, best_i, n, t, nb, tau, tp, float(min_p),
                        BS=bs, NBP=nbp, TOPP=topp, MINP=min_p > 0.0, dp_ptr=dp, du_ptr=du,
                        DEBUG=debug is not None, USE_PDL=pdl, **kw)
    _sample_pick[(1,)](best_s, best_i, rng, out_id, out_token, nb, NBP=nbp, USE_PDL=pdl, pos_ptr=pos,
                       ADVANCE=pos is not None, **kw)
