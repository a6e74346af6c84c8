"""RMSNorm family: Triton kernels (interpreter) vs the torch references, references vs float64."""

import pytest
import torch
from olmo_local.kernels import add_rmsnorm, backend, rmsnorm, rmsnorm_add
from olmo_local.kernels import norm as kn


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def test_references_match_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, generator=gen) * 4
    r = torch.randn(3, 70, generator=gen)
    w = torch.randn(70, generator=gen)
    assert relerr(kn.rmsnorm_ref(x, w, 1e-6), norm64(x, w, 1e-6)) < 1e-6
    normed, res = kn.add_rmsnorm_ref(x, r, w, 1e-6)
    assert relerr(res, x.double() + r.double()) < 1e-7
    assert relerr(normed, norm64(x.double() + r.double(), w, 1e-6)) < 1e-6
    assert relerr(kn.rmsnorm_add_ref(x, r, w, 1e-5), r.double() + norm64(x, w, 1e-5)) < 1e-6


def test_olmo_order_multiplies_weight_before_the_cast():
    """bf16: the weight is applied in fp32 and the product rounded once (not rounded twice)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    w = torch.tensor([1.01, 0.99, 1.03, 0.97])
    expect = norm64(x, w, 1e-6).to(torch.bfloat16)
    assert torch.equal(kn.rmsnorm_ref(x, w, 1e-6), expect)


CASES = [(1, 50, torch.float32), (3, 300, torch.bfloat16), (2, 3840, torch.float32), (1, 11008, torch.bfloat16)]


@pytest.mark.parametrize("rows,d,dtype,decode_warps,early", [c + (0, True) for c in CASES]
                         + [(1, 3840, torch.float32, 1, True), (1, 300, torch.bfloat16, 2, True),
                            (1, 3840, torch.bfloat16, 0, False), (3, 300, torch.float32, 0, False)])
def test_norm_kernels(rows, d, dtype, decode_warps, early, monkeypatch):
    """Every norm kernel against its reference; one-row launches also with DECODE_WARPS set (1, 2); the loads
    at the start (LOADS_EARLY) and in the older order."""
    monkeypatch.setattr(kn, "DECODE_WARPS", decode_warps)
    monkeypatch.setattr(kn, "LOADS_EARLY", early)
    gen = torch.Generator().manual_seed(rows * 10000 + d)
    x = (torch.randn(rows, d, generator=gen) * 3).to(dtype)
    r = torch.randn(rows, d, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1.5e-2
    out = torch.full_like(x, float("nan"))
    y = kn.rmsnorm_triton(x, w, 1e-6, out)
    assert y is out and torch.isfinite(y).all()
    assert relerr(y, kn.rmsnorm_ref(x, w, 1e-6)) < tol

    n1, r1 = kn.add_rmsnorm_triton(x, r, w, 1e-6)
    n2, r2 = kn.add_rmsnorm_ref(x, r, w, 1e-6)
    assert relerr(n1, n2) < tol and relerr(r1, r2) < tol

    # in place: the new residual overwrites the old one
    res = r.clone()
    n3, r3 = kn.add_rmsnorm_triton(x, res, w, 1e-6, residual_out=res)
    assert r3 is res and relerr(res, r2) < tol and relerr(n3, n2) < tol

    assert relerr(kn.rmsnorm_add_triton(x, r, w, 1e-5), kn.rmsnorm_add_ref(x, r, w, 1e-5)) < tol
    res = r.clone()
    kn.rmsnorm_add_triton(x, res, w, 1e-5, out=res)
    assert relerr(res, kn.rmsnorm_add_ref(x, r, w, 1e-5)) < tol

    # the plain residual add (MODE 3), also in place; the reference is torch's own x + r
    want = kn.residual_add_ref(x, r)
    assert want.dtype == r.dtype and torch.equal(want, x + r)
    assert relerr(kn.residual_add_triton(x, r), want) < tol
    res = r.clone()
    assert kn.residual_add_triton(x, res, out=res) is res and relerr(res, want) < tol

    # rmsnorm_add then the next layer's rmsnorm (MODE 4), against the two reference ops in a row
    w2 = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    u1, x1 = kn.rmsnorm_add_rmsnorm_triton(x, r, w, 1e-5, w2, 1e-6)
    x2 = kn.rmsnorm_add_ref(x, r, w, 1e-5)
    u2 = kn.rmsnorm_ref(x2, w2, 1e-6)
    assert relerr(x1, x2) < tol and relerr(u1, u2) < tol
    assert torch.equal(kn.rmsnorm_add_rmsnorm_ref(x, r, w, 1e-5, w2, 1e-6)[0], u2)


def test_leading_dims_and_dispatch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 40, generator=gen)
    r = torch.randn(2, 3, 40, generator=gen)
    w = torch.randn(40, generator=gen)
    with backend("triton"):
        a = rmsnorm(x, w, 1e-6)
        b, c = add_rmsnorm(x, r, w, 1e-6)
        d = rmsnorm_add(x, r, w, 1e-6)
    assert a.shape == x.shape
    assert relerr(a, rmsnorm(x, w, 1e-6)) < 1e-6
    b2, c2 = add_rmsnorm(x, r, w, 1e-6)
    assert relerr(b, b2) < 1e-6 and relerr(c, c2) < 1e-6
    assert relerr(d, rmsnorm_add(x, r, w, 1e-6)) < 1e-6
