"""The fused nf4 GEMV (interpreter) against its reference, and the reference against bitsandbytes'
dequantization as quant.formats implements it (no bitsandbytes needed)."""

import pytest
import torch

from olmo_local.kernels import _triton
from olmo_local.kernels import gemv_nf4 as kn
from olmo_local.quant.formats import dequantize_4bit_range

NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def relerr(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_nf4(n, k, bs, gen):
    packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(n * k // bs, generator=gen) * 0.1 + 0.01
    return packed, absmax


def test_reference_equals_the_bitsandbytes_layout():
    gen = torch.Generator().manual_seed(1)
    n, k, bs = 6, 128, 64
    packed, absmax = random_nf4(n, k, bs, gen)
    w = dequantize_4bit_range(packed, absmax, NF4_CODE, bs, 0, n * k).view(n, k)
    x = torch.randn(1, k, generator=gen)
    assert torch.allclose(kn.nf4_gemv_ref(x, packed, absmax, NF4_CODE, bs, n), x @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k,bs,dtype,split_k,block_w", [
    (70, 256, 64, torch.float32, 1, 16),     # masked rows, 2 iterations, a block per 8 words
    (33, 512, 64, torch.bfloat16, 3, 16),    # split-K with a last short split, bf16 x as pairs
    (16, 192, 32, torch.float32, 2, 8),      # 4 words per block: 2 blocks per iteration
    (40, 1024, 256, torch.bfloat16, None, 16),  # a block spans two iterations; default splits
    (8, 64, 64, torch.float16, 1, 16),       # one word column block, fp16 x
])
def test_nf4_gemv_triton(n, k, bs, dtype, split_k, block_w):
    gen = torch.Generator().manual_seed(n + k)
    packed, absmax = random_nf4(n, k, bs, gen)
    x = torch.randn(1, k, generator=gen).to(dtype)
    want = kn.nf4_gemv_ref(x.float(), packed, absmax, NF4_CODE, bs, n)
    for _ in range(2):  # again: the split-K counters were reset
        out = torch.full((1, n), float("nan"), dtype=dtype)
        y = kn.nf4_gemv_triton(x, packed, absmax, NF4_CODE, bs, n, out, split_k=split_k, block_w=block_w,
                               block_n=32)
        assert y is out and torch.isfinite(y).all()
        assert relerr(y, want) < (1e-5 if dtype == torch.float32 else 1.5e-2)
    assert all(bool((b == 0).all()) for key, b in _triton._WORKSPACES.items() if key[0] == "nf4_cnt")


def test_nf4_fits_and_rejects():
    x = torch.randn(1, 128)
    assert kn.nf4_fits(x, 128, 64) and not kn.nf4_fits(x, 128, 48) and not kn.nf4_fits(torch.randn(2, 128), 128, 64)
    assert not kn.nf4_fits(torch.randn(1, 96), 96, 64)  # a block straddles rows
    packed, absmax = random_nf4(4, 96, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one row"):
        kn.nf4_gemv_triton(torch.randn(2, 96), packed, absmax, NF4_CODE, 32, 4)
    with pytest.raises(ValueError, match="shapes"):
        kn.nf4_gemv_triton(torch.randn(1, 96), packed, absmax[:-1], NF4_CODE, 32, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("n,k", [(17280, 3840), (3840, 11008), (2 * 11008, 3840)])
def test_nf4_gemv_at_7b_shapes_on_cuda(n, k):
    """The default launch (dispatch) at the 7B projections' shapes, bf16 x, against the fp32 reference."""
    gen = torch.Generator().manual_seed(n)
    packed, absmax = random_nf4(n, k, 64, gen)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    want = kn.nf4_gemv_ref(x.float(), packed, absmax, NF4_CODE, 64, n)
    dev = [t.cuda() for t in (x, packed, absmax, NF4_CODE)]
    for _ in range(2):
        got = kn.nf4_gemv(*dev[:3], dev[3], 64, n)
        assert got.shape == (1, n) and relerr(got.float().cpu(), want) < 1e-2
