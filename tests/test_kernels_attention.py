"""Decode attention (bf16/fp32 and int8 KV) and the int8 KV quantizer: Triton kernels (interpreter) vs
the torch references, and the references vs a float64 per-head loop."""

import importlib
import math

import pytest
import torch
from olmo_local.kernels import _triton, attention_decode, backend, quantize_kv_int8

ka = importlib.import_module("olmo_local.kernels.attention_decode")  # the package attribute is the function


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attention_loop(q, k, v, n):
    """float64, one query head at a time: softmax(q k^T / sqrt(hd)) v over positions < n."""
    h, hd = q.shape
    kvh = k.shape[0]
    out = torch.empty(h, hd, dtype=torch.float64)
    for head in range(h):
        kv = head // (h // kvh)
        scores = [float(q[head].double() @ k[kv, p].double()) / math.sqrt(hd) for p in range(n)]
        mx = max(scores)
        w = [math.exp(s - mx) for s in scores]
        tot = sum(w)
        out[head] = sum(w[p] / tot * v[kv, p].double() for p in range(n))
    return out


def test_reference_matches_loop():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 8, generator=gen)
    k = torch.randn(2, 20, 8, generator=gen)
    v = torch.randn(2, 20, 8, generator=gen)
    for n in (1, 7, 20):
        ref = ka.attention_decode_ref(q, k, v, torch.tensor([n], dtype=torch.int32))
        assert relerr(ref, attention_loop(q, k, v, n)) < 1e-6


CASES = [
    # h, kvh, hd, max_ctx, length, num_splits, block_s, dtype
    (4, 2, 16, 100, 37, 4, 8, torch.float32),  # GQA 2, length not a multiple of the block
    (3, 3, 20, 50, 1, 3, 8, torch.float32),  # length 1, hd not a power of two
    (4, 1, 32, 64, 64, 2, 16, torch.bfloat16),  # GQA 4, full cache
    (2, 2, 16, 300, 299, 5, 16, torch.float32),
    (6, 2, 16, 40, 9, 8, 8, torch.float32),  # more splits than blocks of work: empty splits
    (2, 1, 8, 30, 17, 1, 32, torch.float32),  # one split
]


@pytest.mark.parametrize("h,kvh,hd,max_ctx,length,num_splits,block_s,dtype", CASES)
def test_attention_decode_triton(h, kvh, hd, max_ctx, length, num_splits, block_s, dtype):
    gen = torch.Generator().manual_seed(h * 1000 + max_ctx + length)
    q = torch.randn(h, hd, generator=gen).to(dtype)
    k = torch.randn(kvh, max_ctx, hd, generator=gen).to(dtype)
    v = torch.randn(kvh, max_ctx, hd, generator=gen).to(dtype)
    n = torch.tensor([length], dtype=torch.int32)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    out = torch.full((h, hd), float("nan"), dtype=dtype)
    y = ka.attention_decode_triton(q, k, v, n, out, num_splits=num_splits, block_s=block_s)
    assert y is out and torch.isfinite(y).all()
    assert relerr(y, ka.attention_decode_ref(q, k, v, n)) < tol

    # int8 cache of the same data
    kq, ks = ka.quantize_kv_int8_ref(k)
    vq, vs = ka.quantize_kv_int8_ref(v)
    y8 = ka.attention_decode_triton(q, kq, vq, n, k_scale=ks, v_scale=vs, num_splits=num_splits, block_s=block_s)
    r8 = ka.attention_decode_ref(q, kq, vq, n, k_scale=ks, v_scale=vs)
    assert relerr(y8, r8) < tol
    assert relerr(r8, ka.attention_decode_ref(q, k, v, n)) < 3e-2  # int8 KV stays close to the original
    assert all(bool((b == 0).all()) for key, b in _triton._WORKSPACES.items() if key[0] == "attn_cnt")


@pytest.mark.parametrize("by", ["length", "pos"])
def test_attention_lengths_share_one_launch_config(by):
    """One split count (as in a captured graph) serves every length, growing token by token. The length
    comes as such, or as pos = length - 1 (the decode state's position, which no earlier kernel of the
    step writes: the kernel reads it before waiting for the previous kernel and empty splits leave at
    once); the reference takes either, and one of the two must be given."""
    gen = torch.Generator().manual_seed(5)
    h, kvh, hd, max_ctx = 4, 2, 8, 40
    q = torch.randn(h, hd, generator=gen)
    k = torch.randn(kvh, max_ctx, hd, generator=gen)
    v = torch.randn(kvh, max_ctx, hd, generator=gen)
    n = torch.zeros(1, dtype=torch.int32)
    for length in (1, 2, 5, 8, 9, 23, 40):
        n.fill_(length if by == "length" else length - 1)
        given = {by: n}
        y = ka.attention_decode_triton(q, k, v, num_splits=4, block_s=8, **given)
        assert relerr(y, attention_loop(q, k, v, length)) < 1e-5
        assert relerr(ka.attention_decode_ref(q, k, v, **given), attention_loop(q, k, v, length)) < 1e-5
    for bad in (dict(), dict(length=n + 1, pos=n)):
        with pytest.raises(ValueError, match="one of them"):
            ka.attention_decode(q, k, v, **bad)
    assert all(bool((b == 0).all()) for key, b in _triton._WORKSPACES.items() if key[0] == "attn_cnt")


def test_quantize_kv_int8():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, 5, 24, generator=gen)
    k[1, 2] = 0.0  # an all-zero row: scale 0, codes 0
    q, s = ka.quantize_kv_int8_ref(k)
    assert q.dtype == torch.int8 and s.shape == (3, 5)
    assert s[1, 2] == 0 and (q[1, 2] == 0).all()
    assert (q.abs() <= 127).all() and (q.abs().amax(-1)[s > 0] == 127).all()
    assert (q.double() * s.double()[..., None] - k.double()).abs().max() <= s.max() / 2 + 1e-6

    qt, st = ka.quantize_kv_int8_triton(k)
    assert (qt.int() - q.int()).abs().max() <= 1 and (qt != q).float().mean() < 0.01
    assert torch.allclose(st, s, rtol=1e-6, atol=0)

    # one row per head ([KVH, hd] input)
    q1, s1 = ka.quantize_kv_int8_triton(k[:, 0])
    assert q1.shape == (3, 24) and s1.shape == (3,)
    assert torch.equal(q1, qt[:, 0])


@pytest.mark.parametrize("t", [1, 3])
def test_quantize_kv_int8_into_cache_at_pos(t):
    gen = torch.Generator().manual_seed(10 + t)
    kvh, cap, hd = 2, 12, 16
    k = torch.randn(kvh, t, hd, generator=gen)
    pos = torch.tensor([7], dtype=torch.int32)
    caches = []
    for fn in (ka.quantize_kv_int8_ref, ka.quantize_kv_int8_triton):
        qc = torch.full((kvh, cap, hd), 55, dtype=torch.int8)
        sc = torch.full((kvh, cap), -1.0)
        res = fn(k, out=(qc, sc), pos=pos)
        assert res[0] is qc and res[1] is sc
        caches.append((qc, sc))
    (qr, sr), (qk, sk) = caches
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[7:7 + t] = False
    assert (qk[:, untouched] == 55).all() and (sk[:, untouched] == -1).all()
    assert (qk.int() - qr.int()).abs().max() <= 1
    assert torch.allclose(sk, sr)


def test_dispatch():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, generator=gen)
    k = torch.randn(1, 10, 8, generator=gen)
    v = torch.randn(1, 10, 8, generator=gen)
    n = torch.tensor([6], dtype=torch.int32)
    with backend("triton"):
        y = attention_decode(q, k, v, n)
        qq, _ = quantize_kv_int8(k)
    r = attention_decode(q, k, v, n)
    assert relerr(y, r) < 1e-5
    assert (qq.int() - quantize_kv_int8(k)[0].int()).abs().max() <= 1


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("h,kvh,hd,warps", [(4, 4, 16, 4), (6, 2, 24, 4), (6, 2, 24, 1)])
def test_attention_prep(int8, h, kvh, hd, warps, monkeypatch):
    """The fused q/k RMSNorm + cache write + length of a NoPE decode step (one launch) equals the
    unfused reference ops: same normed q, same cache rows (and scales) at pos, nothing else written;
    the reference itself is checked against an explicit formulation. With 4 warps per program and 1."""
    monkeypatch.setattr(ka, "PREP_WARPS", warps)
    gen = torch.Generator().manual_seed(h * hd + int8)
    qkv = (torch.randn(1, (h + 2 * kvh) * hd, generator=gen) * 3).to(torch.bfloat16)
    q_w = (1 + 0.1 * torch.randn(h * hd, generator=gen)).to(torch.bfloat16)
    k_w = (1 + 0.1 * torch.randn(kvh * hd, generator=gen)).to(torch.bfloat16)
    pos = torch.tensor([5], dtype=torch.int32)

    def caches():
        if int8:
            return (torch.zeros(kvh, 9, hd, dtype=torch.int8), torch.zeros(kvh, 9, hd, dtype=torch.int8),
                    torch.zeros(kvh, 9), torch.zeros(kvh, 9))
        return torch.zeros(kvh, 9, hd, dtype=torch.bfloat16), torch.zeros(kvh, 9, hd, dtype=torch.bfloat16), None, None

    results = []
    for fn in (ka.attention_prep_ref, ka.attention_prep_triton):
        kc, vc, ks, vs = caches()
        length = torch.zeros(1, dtype=torch.int32)
        q = fn(qkv, q_w, k_w, 1e-6, 1e-5, kc, vc, pos, length, k_scale=ks, v_scale=vs)
        assert int(length) == 6 and q.shape == (h, hd) and q.dtype == torch.bfloat16
        results.append((q, kc, vc, ks, vs))
    (q0, kc0, vc0, ks0, vs0), (q1, kc1, vc1, ks1, vs1) = results
    assert relerr(q1, q0) < 1e-2  # bf16 outputs (the interpreter truncates fp32 -> bf16)
    others = [p for p in range(9) if p != 5]
    for c0, c1 in ((kc0, kc1), (vc0, vc1)):
        assert not c1[:, others].any()
        if int8:
            assert (c0[:, 5].int() - c1[:, 5].int()).abs().max() <= 1
        else:
            assert relerr(c1[:, 5], c0[:, 5]) < 1e-2
    if int8:
        assert torch.allclose(ks1, ks0, rtol=1e-2) and torch.allclose(vs1, vs0, rtol=1e-6)
    # the reference, spelled out: full-width RMSNorm of q and k, v as is
    qf, kf, vf = qkv.float().view(-1).split([h * hd, kvh * hd, kvh * hd])
    want_q = qf * torch.rsqrt(qf.pow(2).mean() + 1e-6) * q_w.float()
    want_k = kf * torch.rsqrt(kf.pow(2).mean() + 1e-5) * k_w.float()
    assert relerr(q0.float().view(-1), want_q) < 1e-2
    if not int8:
        assert relerr(kc0[:, 5].float().reshape(-1), want_k) < 1e-2
        assert torch.equal(vc0[:, 5].reshape(-1), qkv.view(-1)[(h + kvh) * hd:])
    else:
        deq = (vc0[:, 5].float() * vs0[:, 5, None]).reshape(-1)
        assert relerr(deq, vf) < 1e-2


def test_attention_ctx_hint_tunes_the_launch_not_the_result():
    """A ctx_hint below the cache size picks the short-context launch (fewer splits) and gives the same
    attention output as the launch tuned for the cache, both equal to the reference."""
    gen = torch.Generator().manual_seed(7)
    h, hd, max_ctx, n = 2, 16, ka.LONG_CTX_LAUNCH, 300
    q = torch.randn(h, hd, generator=gen).to(torch.bfloat16)
    k = torch.randn(h, max_ctx, hd, generator=gen).to(torch.bfloat16)
    v = torch.randn(h, max_ctx, hd, generator=gen).to(torch.bfloat16)
    pos = torch.tensor([n - 1], dtype=torch.int32)
    ref = ka.attention_decode_ref(q, k, v, pos=pos)
    outs = []
    for hint in (None, ka.LONG_CTX_LAUNCH - 1):
        outs.append(ka.attention_decode_triton(q, k, v, pos=pos, ctx_hint=hint))
        assert relerr(outs[-1], ref) < 1e-2
    short = ka.default_num_splits(ka.LONG_CTX_LAUNCH - 1, h, q.device)
    long = ka.default_num_splits(max_ctx, h, q.device)
    assert short < long
    assert {k[1] for k in _triton._WORKSPACES if k[0] == "attn_m"} >= {(h, short), (h, long)}


@pytest.mark.parametrize("pre", [True, False])
@pytest.mark.parametrize("cache", ["bf16", "int8", "fp32"])
@pytest.mark.parametrize("h,kvh,hd,pos,splits", [(4, 4, 16, 5, 1), (6, 2, 24, 9, 3), (6, 2, 24, 8, 9),
                                                (2, 1, 32, 0, 2), (4, 2, 16, 40, 4)])
def test_attention_decode_prep_equals_prep_then_attention(cache, h, kvh, hd, pos, splits, pre, monkeypatch):
    """attention_decode_prep (q/k norms from given row sums, k and v written at pos, attention over 0..pos) in
    one launch: the kernel (position pos taken from the qkv row by the split that holds it, alone in its split
    or not, the only split, GQA; splits of one tile and of several; the first tile loaded before the wait or
    in the loop) equals the reference; the reference equals attention_prep_ref followed by
    attention_decode_ref; the caches differ from the old ones only at pos."""
    monkeypatch.setattr(ka, "KV_BEFORE_WAIT", pre)
    gen = torch.Generator().manual_seed(h * hd + pos + splits)
    dt = torch.float32 if cache == "fp32" else torch.bfloat16
    qkv = (torch.randn(1, (h + 2 * kvh) * hd, generator=gen) * 3).to(dt)
    q_w = (1 + 0.1 * torch.randn(h * hd, generator=gen)).to(dt)
    k_w = (1 + 0.1 * torch.randn(kvh * hd, generator=gen)).to(dt)
    qf = qkv.float().view(-1)
    # row sums as three row blocks would give them (the q|k boundary inside the middle one)
    cut = [0, (h * hd) // 2, h * hd + (kvh * hd) // 2, qkv.numel()]
    ss = torch.zeros(3, 2)
    for b in range(3):
        r = torch.arange(cut[b], cut[b + 1])
        sq = qf[r].square()
        ss[b, 0] = sq[r < h * hd].sum()
        ss[b, 1] = sq[(r >= h * hd) & (r < (h + kvh) * hd)].sum()
    n_ctx = pos + 3
    p_t = torch.tensor([pos], dtype=torch.int32)

    def caches():
        g = torch.Generator().manual_seed(99)
        if cache == "int8":
            kc = torch.randint(-127, 128, (kvh, n_ctx, hd), generator=g, dtype=torch.int8)
            vc = torch.randint(-127, 128, (kvh, n_ctx, hd), generator=g, dtype=torch.int8)
            return kc, vc, torch.rand(kvh, n_ctx, generator=g) / 40, torch.rand(kvh, n_ctx, generator=g) / 40
        kc = torch.randn(kvh, n_ctx, hd, generator=g).to(dt)
        return kc, torch.randn(kvh, n_ctx, hd, generator=g).to(dt), None, None

    outs = []
    for run in ("ref", "kernel", "unfused"):
        kc, vc, ks, vs = caches()
        if run == "ref":
            o = ka.attention_decode_prep_ref(qkv, ss, q_w, k_w, 1e-6, 1e-5, kc, vc, p_t, k_scale=ks, v_scale=vs)
        elif run == "kernel":
            o = ka.attention_decode_prep_triton(qkv, ss, q_w, k_w, 1e-6, 1e-5, kc, vc, p_t, k_scale=ks, v_scale=vs,
                                                num_splits=splits, block_s=4, num_warps=2)
        else:
            length = torch.zeros(1, dtype=torch.int32)
            q = ka.attention_prep_ref(qkv, q_w, k_w, 1e-6, 1e-5, kc, vc, p_t, length, k_scale=ks, v_scale=vs)
            o = ka.attention_decode_ref(q, kc, vc, length, k_scale=ks, v_scale=vs)
        assert o.shape == (h, hd) and o.dtype == dt
        outs.append((o, kc, vc, ks, vs))
    (o0, kc0, vc0, ks0, vs0), (o1, kc1, vc1, ks1, vs1), (o2, kc2, vc2, ks2, vs2) = outs
    tol_o = 1e-5 if dt == torch.float32 else 2e-2
    assert relerr(o1, o0) < tol_o and relerr(o0, o2) < tol_o
    old = caches()
    others = [p for p in range(n_ctx) if p != pos]
    for c0, c1, c2, c_old in ((kc0, kc1, kc2, old[0]), (vc0, vc1, vc2, old[1])):
        assert torch.equal(c1[:, others], c_old[:, others]) and torch.equal(c0[:, others], c_old[:, others])
        if cache == "int8":
            assert (c0[:, pos].int() - c1[:, pos].int()).abs().max() <= 1
            assert (c0[:, pos].int() - c2[:, pos].int()).abs().max() <= 1
        else:
            assert relerr(c1[:, pos], c0[:, pos]) < tol_o and relerr(c2[:, pos], c0[:, pos]) < tol_o
    if cache == "int8":
        assert torch.allclose(ks1[:, pos], ks0[:, pos], rtol=1e-2) and torch.allclose(vs1[:, pos], vs0[:, pos])
        assert torch.equal(ks1[:, others], old[2][:, others])


def test_attention_decode_prep_needs_row_sums_of_the_right_shape():
    qkv = torch.randn(1, 6 * 16)
    kc = vc = torch.zeros(2, 4, 16)
    with pytest.raises(ValueError, match="row sums"):
        ka.attention_decode_prep_triton(qkv, torch.zeros(3), torch.ones(32), torch.ones(32), 1e-6, 1e-6, kc, vc,
                                        torch.tensor([0], dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("cache", ["bf16", "int8"])
@pytest.mark.parametrize("pos,ctx_hint", [(300, None), (4000, None), (31, 20000)])
def test_attention_decode_prep_on_cuda(cache, pos, ctx_hint):
    """The 7B attention shape on the GPU (30 heads of 128, a 4K cache, the launch as the decode step makes it,
    short and long-context regimes): attention_decode_prep's kernel equals its reference."""
    h, kvh, hd, n_ctx = 30, 30, 128, 4096
    gen = torch.Generator().manual_seed(pos)
    qkv = (torch.randn(1, (h + 2 * kvh) * hd, generator=gen) * 2).to(torch.bfloat16).cuda()
    q_w = (1 + 0.1 * torch.randn(h * hd, generator=gen)).to(torch.bfloat16).cuda()
    k_w = (1 + 0.1 * torch.randn(kvh * hd, generator=gen)).to(torch.bfloat16).cuda()
    ss = torch.stack([qkv[0, : h * hd].float().square().sum(), qkv[0, h * hd:(h + kvh) * hd].float().square().sum()])
    ss = torch.cat([ss[None] * 0.25, ss[None] * 0.75])  # two row blocks
    p_t = torch.tensor([pos], dtype=torch.int32).cuda()
    outs = []
    for fn in (ka.attention_decode_prep_ref, ka.attention_decode_prep):
        g = torch.Generator().manual_seed(7)
        if cache == "int8":
            kc = torch.randint(-127, 128, (kvh, n_ctx, hd), generator=g, dtype=torch.int8).cuda()
            vc = torch.randint(-127, 128, (kvh, n_ctx, hd), generator=g, dtype=torch.int8).cuda()
            sc = dict(k_scale=(torch.rand(kvh, n_ctx, generator=g) / 40).cuda(),
                      v_scale=(torch.rand(kvh, n_ctx, generator=g) / 40).cuda())
        else:
            kc = torch.randn(kvh, n_ctx, hd, generator=g).to(torch.bfloat16).cuda()
            vc = torch.randn(kvh, n_ctx, hd, generator=g).to(torch.bfloat16).cuda()
            sc = {}
        kw = {} if fn is ka.attention_decode_prep_ref else dict(ctx_hint=ctx_hint)
        outs.append((fn(qkv, ss, q_w, k_w, 1e-6, 1e-6, kc, vc, p_t, **sc, **kw), kc, vc))
    (o0, kc0, vc0), (o1, kc1, vc1) = outs
    assert relerr(o1, o0) < 1e-2
    if cache == "int8":
        assert (kc0.int() - kc1.int()).abs().max() <= 1 and (vc0.int() - vc1.int()).abs().max() <= 1
    else:
        assert torch.equal(vc0, vc1) and relerr(kc1[:, pos], kc0[:, pos]) < 1e-2
