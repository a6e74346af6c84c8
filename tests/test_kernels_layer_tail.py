"""The one-launch layer tail (kernels/layer_tail.py) against the separate reference ops: in the
interpreter phase by phase (its programs run one after another, so the grid barriers of the one-launch
form cannot run there), and on CUDA as one launch with its barriers."""

import pytest
import torch
from olmo_local.kernels import _triton
from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels import layer_tail as lt

from test_kernels_gemv import random_q4


def make_case(d: int, ko: int, i: int, seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)

    def lin(n, k, scale):
        _q, packed, s, m = random_q4(n, k, 128, gen)
        s, m = (s.float() * scale).half(), (m.float() * scale).half()
        return tuple(t.to(device) for t in k4.q4_tile(packed, s, m, 128))

    y = torch.randn(1, ko, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(1, d, generator=gen).to(torch.bfloat16).to(device)
    w1 = (1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16).to(device)
    w2 = (1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16).to(device)
    # weights scaled so that every stage stays O(1) (the MLP input is normed)
    return y, lin(d, ko, 1.0), lin(2 * i, d, 1.0), lin(d, i, 0.2), x, w1, w2


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| over max |b|: bf16 results of fp32 sums taken in another order differ by an ulp."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def accumulators_are_zero() -> bool:
    return all(bool((buf == 0).all()) for key, buf in _triton._WORKSPACES.items()
               if key[0] in ("tail_acc_o", "tail_acc_gu", "tail_cnt"))


@pytest.mark.parametrize("mode", ["pre", "post"])
@pytest.mark.parametrize("d,ko,i,programs,block_n", [
    (256, 384, 384, 3, 64),     # several tasks per program, splits of one group
    (384, 256, 640, 7, 128),    # row blocks past the last row (masked), uneven splits
    (128, 128, 128, 2, 256),    # one row block, fewer programs than tasks
])
def test_layer_tail_matches_the_separate_ops(mode, d, ko, i, programs, block_n):
    y, o, gu, dn, x, w1, w2 = make_case(d, ko, i, seed=d + ko + i)
    eps1, eps2 = 1e-6, 1e-5
    r_ref, d_ref = lt.layer_tail_ref(y, o, gu, dn, x, w1, eps1, w2, eps2, mode)
    for _ in range(2):  # the second call finds the accumulators the first one left (they must be zero)
        xo, dd = lt.layer_tail_triton(y, o, gu, dn, x, w1, eps1, w2, eps2, mode, programs=programs,
                                      block_n=block_n)
        assert close(xo, r_ref) < 2e-2
        if mode == "pre":
            assert close(dd, d_ref) < 2e-2
        else:
            assert dd is None
        assert accumulators_are_zero()
    # the residual really moved: a kernel that skipped a phase would leave x or a wrong d behind
    assert close(xo, x) > 1e-1


def test_layer_tail_down_output_is_not_the_residual_for_post_norm():
    y, o, gu, dn, x, w1, w2 = make_case(128, 256, 256, seed=7)
    pre_r, _ = lt.layer_tail_ref(y, o, gu, dn, x, w1, 1e-6, w2, 1e-6, "pre")
    post_x, _ = lt.layer_tail_triton(y, o, gu, dn, x, w1, 1e-6, w2, 1e-6, "post", programs=4, block_n=64)
    post_ref, _ = lt.layer_tail_ref(y, o, gu, dn, x, w1, 1e-6, w2, 1e-6, "post")
    assert close(post_x, post_ref) < 2e-2
    assert close(post_x, pre_r) > 1e-1  # the modes differ (norm placement)


def test_layer_tail_fits_checks_shapes():
    y, o, gu, dn, x, w1, w2 = make_case(128, 256, 384, seed=3)
    assert lt.layer_tail_fits(y, o, gu, dn, x)
    assert not lt.layer_tail_fits(y.float(), o, gu, dn, x)  # fp32 activations: not this kernel
    assert not lt.layer_tail_fits(y[:, :200], o, gu, dn, x)  # width not whole groups
    assert not lt.layer_tail_fits(y, dn, gu, o, x)  # projections swapped: shapes do not chain
    with pytest.raises(ValueError, match="layer_tail"):
        lt.layer_tail_triton(y, dn, gu, o, x, w1, 1e-6)


def test_layer_tail_dispatch_on_cpu_is_the_reference():
    y, o, gu, dn, x, w1, w2 = make_case(128, 256, 256, seed=5)
    r, d = lt.layer_tail(y, o, gu, dn, x, w1, 1e-6, w2, 1e-6, "pre")
    r_ref, d_ref = lt.layer_tail_ref(y, o, gu, dn, x, w1, 1e-6, w2, 1e-6, "pre")
    assert torch.equal(r, r_ref) and torch.equal(d, d_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("mode", ["pre", "post"])
@pytest.mark.parametrize("shape", [(3840, 5760, 11008), (3840, 3840, 11008), (256, 384, 640)])
def test_layer_tail_one_launch_on_cuda(mode, shape):
    d, ko, i = shape
    y, o, gu, dn, x, w1, w2 = make_case(d, ko, i, seed=11, device="cuda")
    r_ref, d_ref = lt.layer_tail_ref(y, o, gu, dn, x, w1, 1e-6, w2, 1e-5, mode)
    for phased in (False, True, False):  # one launch, one launch per phase, one launch again
        xo, dd = lt.layer_tail_triton(y, o, gu, dn, x, w1, 1e-6, w2, 1e-5, mode, phased=phased)
        torch.cuda.synchronize()
        assert close(xo, r_ref) < 1e-2
        if mode == "pre":
            assert close(dd, d_ref) < 1e-2
        assert accumulators_are_zero()
