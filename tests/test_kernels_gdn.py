"""Gated DeltaNet decode step: Triton kernel (interpreter) vs the torch reference, including the
in-place conv/recurrent state updates, and the reference vs a float64 per-head loop written from
docs/olmo-hybrid.md §5.2-§5.6."""

import math

import pytest
import torch
from olmo_local.kernels import _triton, backend, gdn_decode_step
from olmo_local.kernels import gdn_decode as kg


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(hk, hv, dk, dv, kconv, dtype, gen):
    c = 2 * hk * dk + hv * dv
    return {
        "qkv": torch.randn(c, generator=gen).to(dtype),
        "z": torch.randn(hv * dv, generator=gen).to(dtype),
        "a": torch.randn(hv, generator=gen).to(dtype),
        "b": torch.randn(hv, generator=gen).to(dtype),
        "conv_weight": (torch.randn(c, kconv, generator=gen) * 0.5).to(dtype),
        "conv_state": torch.randn(c, kconv - 1, generator=gen).to(dtype),
        "A_log": torch.rand(hv, generator=gen) * 2 - 1,
        "dt_bias": torch.randn(hv, generator=gen) * 0.5,
        "norm_weight": (1 + 0.2 * torch.randn(dv, generator=gen)).to(dtype),
        "rec_state": torch.randn(hv, dk, dv, generator=gen) * 0.3,
    }


def clone(inp):
    return {k: v.clone() for k, v in inp.items()}


def call(fn, inp, neg, **kw):
    return fn(inp["qkv"], inp["z"], inp["a"], inp["b"], inp["conv_weight"], inp["conv_state"], inp["A_log"],
              inp["dt_bias"], inp["norm_weight"], inp["rec_state"], neg, **kw)


def spec_step(inp, hk, hv, dk, dv, neg):
    """float64, one head at a time, straight from the spec text."""
    d = {k: v.double() for k, v in inp.items()}
    c = d["qkv"].numel()
    kconv = d["conv_weight"].shape[1]
    conv_out = torch.empty(c, dtype=torch.float64)
    new_conv = torch.empty(c, kconv - 1, dtype=torch.float64)
    for ch in range(c):
        xs = list(d["conv_state"][ch]) + [d["qkv"][ch]]  # x_{t-K+1} .. x_t
        acc = sum(d["conv_weight"][ch, j] * xs[j] for j in range(kconv))
        conv_out[ch] = acc / (1 + math.exp(-acc))
        new_conv[ch] = torch.stack(xs[1:])
    S = d["rec_state"].clone()
    y = torch.empty(hv, dv, dtype=torch.float64)
    r = hv // hk
    for h in range(hv):
        kh = h // r
        q = conv_out[kh * dk:(kh + 1) * dk]
        k = conv_out[hk * dk + kh * dk: hk * dk + (kh + 1) * dk]
        v = conv_out[2 * hk * dk + h * dv: 2 * hk * dk + (h + 1) * dv]
        q = q / math.sqrt(float((q * q).sum()) + 1e-6) / math.sqrt(dk)
        k = k / math.sqrt(float((k * k).sum()) + 1e-6)
        beta = 1 / (1 + math.exp(-float(d["b"][h]))) * (2 if neg else 1)
        xa = float(d["a"][h] + d["dt_bias"][h])
        softplus = xa if xa > 20 else math.log1p(math.exp(xa))
        g = -math.exp(float(d["A_log"][h])) * softplus
        Sh = math.exp(g) * S[h]  # 1. decay
        m = Sh.T @ k  # 2. read
        delta = beta * (v - m)  # 3.
        Sh = Sh + torch.outer(k, delta)  # 4. write
        o = Sh.T @ q  # 5. read with the updated state
        S[h] = Sh
        z = d["z"][h * dv:(h + 1) * dv]
        y[h] = o / torch.sqrt((o * o).mean() + 1e-5) * d["norm_weight"] * z / (1 + torch.exp(-z))
    return y.reshape(-1), S, new_conv


@pytest.mark.parametrize("hk,hv,dk,dv,neg", [(2, 2, 12, 20, True), (1, 2, 8, 16, False), (2, 4, 12, 20, True)])
def test_reference_matches_spec(hk, hv, dk, dv, neg):
    gen = torch.Generator().manual_seed(hk * 100 + hv * 10 + dk)
    inp = make_inputs(hk, hv, dk, dv, 4, torch.float32, gen)
    inp["a"][0] = 25.0  # softplus linear branch
    y64, s64, c64 = spec_step(inp, hk, hv, dk, dv, neg)
    work = clone(inp)
    y = call(kg.gdn_decode_step_ref, work, neg)
    assert relerr(y, y64) < 1e-5
    assert relerr(work["rec_state"], s64) < 1e-5
    assert torch.equal(work["conv_state"].double(), c64)


CASES = [
    # hk, hv, dk, dv, kconv, block_v, dtype, neg
    (2, 2, 12, 20, 4, 8, torch.float32, True),  # dv split in 3 blocks, the last partial
    (2, 4, 12, 20, 4, 32, torch.float32, True),  # Hv = 2 Hk
    (1, 3, 16, 24, 4, 8, torch.float32, False),  # Hv = 3 Hk, 3 value heads x 3 blocks share a key head
    (3, 3, 16, 32, 4, 16, torch.bfloat16, True),
    (2, 2, 96, 192, 4, 64, torch.float32, True),  # 7B head dims
    (1, 1, 8, 8, 2, 8, torch.float32, True),  # conv width 2
]


@pytest.mark.parametrize("hk,hv,dk,dv,kconv,block_v,dtype,neg", CASES)
def test_gdn_step_triton(hk, hv, dk, dv, kconv, block_v, dtype, neg):
    gen = torch.Generator().manual_seed(hk + 7 * hv + 31 * dk + dv)
    inp = make_inputs(hk, hv, dk, dv, kconv, dtype, gen)
    ref_in, ker_in = clone(inp), clone(inp)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    for _step in range(2):  # two steps: the second runs on the states the first wrote
        r = call(kg.gdn_decode_step_ref, ref_in, neg)
        out = torch.full((hv * dv,), float("nan"), dtype=dtype)
        y = call(kg.gdn_decode_step_triton, ker_in, neg, out=out, block_v=block_v)
        assert y is out and torch.isfinite(y).all()
        assert relerr(y, r) < tol
        assert relerr(ker_in["rec_state"], ref_in["rec_state"]) < 1e-5
        assert torch.equal(ker_in["conv_state"], ref_in["conv_state"])
        # fresh token inputs for the next step
        nxt = make_inputs(hk, hv, dk, dv, kconv, dtype, gen)
        for key in ("qkv", "z", "a", "b"):
            ref_in[key] = nxt[key].clone()
            ker_in[key] = nxt[key].clone()
    assert all(bool((b == 0).all()) for key, b in _triton._WORKSPACES.items() if key[0] == "gdn_cnt")


@pytest.mark.parametrize("block_v,warps", [(16, 1), (8, 2), (64, 8)])
def test_gdn_step_triton_with_the_state_dk_major(block_v, warps):
    """The recurrent state stored with dk contiguous ([Hv, dv, dk] in memory, seen as its [Hv, dk, dv]
    transpose) gives the same step as the contiguous state, updated in place in its own layout; with
    one, two and eight warps per program."""
    hk, hv, dk, dv = 2, 2, 96, 40
    gen = torch.Generator().manual_seed(block_v + warps)
    inp = make_inputs(hk, hv, dk, dv, 4, torch.float32, gen)
    ref_in, ker_in = clone(inp), clone(inp)
    ker_in["rec_state"] = inp["rec_state"].transpose(1, 2).contiguous().transpose(1, 2)
    assert ker_in["rec_state"].stride()[1:] == (1, dk)
    for _step in range(2):
        y_ref = call(kg.gdn_decode_step_ref, ref_in, True)
        y = call(kg.gdn_decode_step_triton, ker_in, True, block_v=block_v, num_warps=warps)
        assert relerr(y, y_ref) < 1e-5
        assert relerr(ker_in["rec_state"], ref_in["rec_state"]) < 1e-5
        assert torch.equal(ker_in["conv_state"], ref_in["conv_state"])
    assert ker_in["rec_state"].stride()[1:] == (1, dk)
    with pytest.raises(ValueError, match="rec_state"):
        call(kg.gdn_decode_step_triton, clone(inp) | {"rec_state": torch.zeros(hv, dk, 2 * dv)[:, :, :dv]}, True)


def test_gdn_step_slices_of_one_projection():
    """qkv, z, a, b as views into one projection row, conv weight in Conv1d layout [C, 1, K]."""
    hk, hv, dk, dv = 2, 2, 12, 20
    gen = torch.Generator().manual_seed(99)
    inp = make_inputs(hk, hv, dk, dv, 4, torch.float32, gen)
    c = inp["qkv"].numel()
    proj = torch.cat([inp["qkv"], inp["z"], inp["a"], inp["b"]]).unsqueeze(0)  # [1, C + Hv*dv + 2Hv]
    views = dict(inp)
    views["qkv"] = proj[0, :c]
    views["z"] = proj[0, c:c + hv * dv]
    views["a"] = proj[0, c + hv * dv:c + hv * dv + hv]
    views["b"] = proj[0, c + hv * dv + hv:]
    views["conv_weight"] = inp["conv_weight"].unsqueeze(1)
    ref_in, ker_in = clone(views), clone(views)
    with backend("torch"):
        r = call(gdn_decode_step, ref_in, True)
    with backend("triton"):
        y = call(gdn_decode_step, ker_in, True)
    assert relerr(y, r) < 1e-5
    assert relerr(ker_in["rec_state"], ref_in["rec_state"]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_model", [96, 600])  # one block of u, several blocks with a masked tail
@pytest.mark.parametrize("ab_once_max", [None, 0])  # W_ab rows whole before the wait / the chunk loop
def test_gdn_step_with_fused_ab_projection(dtype, d_model, ab_once_max):
    """ab_from=(u, W_ab): the a|b projection computed inside the step equals projecting first (in
    fp32) and passing a, b — for the reference and the Triton kernel (both forms of its a|b
    projection), states included."""
    hk, hv, dk, dv = 2, 4, 16, 24
    gen = torch.Generator().manual_seed(d_model)
    inp = make_inputs(hk, hv, dk, dv, 4, dtype, gen)
    u = torch.randn(d_model, generator=gen).to(dtype)
    w_ab = (torch.randn(2 * hv, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    ab = w_ab.float() @ u.float()
    plain = clone(inp)
    plain["a"], plain["b"] = ab[:hv], ab[hv:]
    want = call(kg.gdn_decode_step_ref, plain, True)
    fused_ref = clone(inp)
    got_ref = kg.gdn_decode_step_ref(fused_ref["qkv"], fused_ref["z"], None, None, fused_ref["conv_weight"],
                                     fused_ref["conv_state"], fused_ref["A_log"], fused_ref["dt_bias"],
                                     fused_ref["norm_weight"], fused_ref["rec_state"], True, ab_from=(u, w_ab))
    assert relerr(got_ref, want) < 1e-6
    fused = clone(inp)
    got = kg.gdn_decode_step_triton(fused["qkv"], fused["z"], None, None, fused["conv_weight"], fused["conv_state"],
                                    fused["A_log"], fused["dt_bias"], fused["norm_weight"], fused["rec_state"], True,
                                    ab_from=(u, w_ab), block_v=8, ab_once_max=ab_once_max)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert relerr(got, want) < tol
    assert relerr(fused["rec_state"], plain["rec_state"]) < 1e-5
    assert torch.equal(fused["conv_state"], plain["conv_state"])


@pytest.mark.parametrize("ab_once_max", [None, 0])
def test_gdn_step_fused_ab_scaled_by_a_folded_norm(ab_once_max):
    """ab_rstd=(ss, eps): u is the x~ of a folded norm, so the fused a|b projection is scaled by
    rsqrt(sum(ss) / D + eps): the step equals one given a|b of the normed input (reference and kernel)."""
    hk, hv, dk, dv, d_model = 2, 4, 16, 24, 96
    gen = torch.Generator().manual_seed(3)
    inp = make_inputs(hk, hv, dk, dv, 4, torch.float32, gen)
    xt = torch.randn(d_model, generator=gen) * 3
    ss = torch.tensor([5.0, 7.5, 11.25]) * d_model  # three row blocks' sums of squares
    eps = 1e-6
    w_ab = torch.randn(2 * hv, d_model, generator=gen) * d_model ** -0.5
    ab = (w_ab @ xt) * torch.rsqrt(ss.sum() / d_model + eps)
    plain = clone(inp)
    plain["a"], plain["b"] = ab[:hv], ab[hv:]
    want = call(kg.gdn_decode_step_ref, plain, True)
    for fn, kw in ((kg.gdn_decode_step_ref, {}), (kg.gdn_decode_step_triton, dict(block_v=8, ab_once_max=ab_once_max))):
        st = clone(inp)
        got = fn(st["qkv"], st["z"], None, None, st["conv_weight"], st["conv_state"], st["A_log"], st["dt_bias"],
                 st["norm_weight"], st["rec_state"], True, ab_from=(xt, w_ab), ab_rstd=(ss, eps), **kw)
        assert relerr(got, want) < 1e-5
        assert relerr(st["rec_state"], plain["rec_state"]) < 1e-5


@pytest.mark.parametrize("block_v,warps,dk_major,dtype", [(16, 1, True, torch.float32), (8, 2, False, torch.float32),
                                                           (16, 1, True, torch.bfloat16), (64, 8, False, torch.bfloat16)])
def test_gdn_step_folded_equals_the_step_with_its_conv_and_norm(block_v, warps, dk_major, dtype):
    """folded=True: the step takes the conv's fp32 activations (the in-projection's conv epilogue) and returns
    x~ = o * w * silu(z) and partial sums of o^2 per head, with no counter or last-program tail; x~ scaled by
    each head's rsqrt(sum / dv + 1e-5) is the plain step's output. Reference and kernel (several blocks per
    head, contiguous and dk-major state); the conv state is not touched."""
    hk, hv, dk, dv = 2, 4, 16, 48
    gen = torch.Generator().manual_seed(block_v + warps)
    inp = make_inputs(hk, hv, dk, dv, 4, dtype, gen)
    plain = clone(inp)
    want = call(kg.gdn_decode_step_ref, plain, True)
    c = inp["qkv"].numel()
    win = torch.cat([inp["conv_state"].float(), inp["qkv"].float()[:, None]], 1)
    act = torch.nn.functional.silu((win * inp["conv_weight"].float()).sum(1))
    for fn in (kg.gdn_decode_step_ref, kg.gdn_decode_step_triton):
        f = clone(inp)
        f["qkv"] = act.clone()
        if dk_major:
            f["rec_state"] = f["rec_state"].transpose(1, 2).contiguous().transpose(1, 2)
        kw = dict(block_v=block_v, num_warps=warps) if fn is kg.gdn_decode_step_triton else {}
        xt, hs = call(fn, f, True, folded=True, **kw)
        assert hs.shape[0] == hv and hs.dtype == torch.float32
        rs = torch.rsqrt(hs.sum(1) / dv + 1e-5).repeat_interleave(dv)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert relerr(xt.float() * rs, want.float()) < tol, fn.__name__
        assert relerr(f["rec_state"], plain["rec_state"]) < 1e-5
        assert torch.equal(f["conv_state"], inp["conv_state"])  # untouched: the conv epilogue updates it
        assert c == f["qkv"].numel()
    bad = clone(inp)
    bad["qkv"] = act.to(torch.bfloat16)
    with pytest.raises(ValueError, match="folded"):
        call(kg.gdn_decode_step_triton, bad, True, folded=True)  # the activations must be fp32
