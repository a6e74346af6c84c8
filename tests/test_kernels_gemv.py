"""q4/q8 decode GEMV: Triton kernels (interpreter) vs the torch references, and the references vs
an independent float64 formulation written from docs/contracts.md."""

import pytest
import torch
from olmo_local.kernels import _triton, backend, q4_gemv, q8_gemv
from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels import gemv_q8 as k8


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    # interpreter: fp32 is exact math; bf16 outputs are truncated (not rounded) by the interpreter
    return 1e-5 if dtype == torch.float32 else 1.5e-2


def pack_q4_loop(q: torch.Tensor, group: int) -> torch.Tensor:
    """Pack integer codes q [N, K] in 0..15 per the contract, one byte at a time."""
    n, k = q.shape
    out = torch.zeros(n, k // 2, dtype=torch.uint8)
    half = group // 2
    for g in range(k // group):
        for i in range(half):
            lo = q[:, g * group + i]
            hi = q[:, g * group + half + i]
            out[:, g * half + i] = (lo | (hi << 4)).to(torch.uint8)
    return out


def random_q4(n: int, k: int, group: int, gen: torch.Generator):
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.05 + 0.005).half()
    mins = (-scales.float() * (4 + 8 * torch.rand(n, k // group, generator=gen))).half()
    return q, pack_q4_loop(q, group), scales, mins


def counters_are_zero() -> bool:
    return all(bool((buf == 0).all()) for key, buf in _triton._WORKSPACES.items() if key[0].endswith("cnt"))


# ---------------------------------------------------------------------------------------------- q4
def test_q4_dequantize_matches_contract():
    gen = torch.Generator().manual_seed(1)
    for n, k, group in [(5, 64, 32), (3, 256, 128), (4, 192, 64)]:
        q, packed, scales, mins = random_q4(n, k, group, gen)
        expect = torch.empty(n, k, dtype=torch.float64)
        for col in range(k):
            g = col // group
            expect[:, col] = q[:, col].double() * scales[:, g].double() + mins[:, g].double()
        assert torch.allclose(k4.q4_dequantize(packed, scales, mins, group).double(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,k,group", [(50, 96, 32), (8, 256, 128)])
def test_q4_ref_vs_float64(n, k, group):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    q, packed, scales, mins = random_q4(n, k, group, gen)
    w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
    x = torch.randn(3, k, generator=gen)
    assert relerr(k4.q4_gemv_ref(x, packed, scales, mins, group), x.double() @ w.T) < 1e-6
    y = k4.q4_gemv_silu_mul_ref(x, packed, scales, mins, group)
    full = x.double() @ w.T
    i = n // 2
    assert relerr(y, torch.nn.functional.silu(full[:, :i]) * full[:, i : 2 * i]) < 1e-6


Q4_CASES = [
    # n, k, group, t, split_k, dtype
    (50, 96, 32, 1, None, torch.float32),
    (50, 160, 32, 2, 3, torch.float32),  # 5 groups over 3 splits, N not a multiple of the block
    (33, 256, 64, 3, 2, torch.float32),
    (64, 512, 128, 1, 2, torch.bfloat16),
    (20, 384, 128, 8, 3, torch.float32),  # T = 8
    (1, 64, 32, 1, 1, torch.float32),  # one row
    # bf16 x takes the packed bf16x2 path (emulated in fp32 by the interpreter): pairs of columns
    # (4m+j, 4m+j+2) per nibble shift, odd N, several groups per split, T > 1
    (50, 96, 32, 3, None, torch.bfloat16),
    (33, 256, 64, 2, 3, torch.bfloat16),
]


@pytest.mark.parametrize("n,k,group,t,split_k,dtype", Q4_CASES)
def test_q4_gemv_triton(n, k, group, t, split_k, dtype):
    gen = torch.Generator().manual_seed(7 * n + k + t)
    _, packed, scales, mins = random_q4(n, k, group, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    y = k4.q4_gemv_triton(x, packed, scales, mins, group, out, split_k=split_k)
    assert y is out and torch.isfinite(y).all()
    assert relerr(y, k4.q4_gemv_ref(x, packed, scales, mins, group)) < tol(dtype)
    assert counters_are_zero()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_q4_gemv_without_prefetch_matches(dtype, gated):
    """prefetch=False (loads of each group inside its iteration) gives the same result as the
    default software-pipelined loop, at split boundaries too."""
    gen = torch.Generator().manual_seed(5)
    _, packed, scales, mins = random_q4(36, 320, 32, gen)
    x = torch.randn(2, 320, generator=gen).to(dtype)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    ref = k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref
    a = kern(x, packed, scales, mins, 32, split_k=3, block_n=16, prefetch=True)
    b = kern(x, packed, scales, mins, 32, split_k=3, block_n=16, prefetch=False)
    assert torch.equal(a, b)
    assert relerr(a, ref(x, packed, scales, mins, 32)) < tol(dtype)
    assert counters_are_zero()


@pytest.mark.parametrize("n2,k,group,t,split_k,dtype", [
    (40, 96, 32, 1, 1, torch.float32),
    (100, 256, 64, 2, 2, torch.bfloat16),
    (34, 384, 128, 3, 3, torch.float32),
])
def test_q4_gemv_silu_mul_triton(n2, k, group, t, split_k, dtype):
    gen = torch.Generator().manual_seed(11 * n2 + k + t)
    _, packed, scales, mins = random_q4(n2, k, group, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    y = k4.q4_gemv_silu_mul_triton(x, packed, scales, mins, group, split_k=split_k, block_n=16)
    assert y.shape == (t, n2 // 2) and y.dtype == dtype
    assert relerr(y, k4.q4_gemv_silu_mul_ref(x, packed, scales, mins, group)) < tol(dtype)
    assert counters_are_zero()


def test_q4_vector_input_and_dispatch():
    gen = torch.Generator().manual_seed(3)
    _, packed, scales, mins = random_q4(24, 128, 64, gen)
    x = torch.randn(128, generator=gen)
    with backend("triton"):
        y = q4_gemv(x, packed, scales, mins, 64)
    with backend("torch"):
        r = q4_gemv(x, packed, scales, mins, 64)
    assert y.shape == r.shape == (24,)
    assert relerr(y, r) < 1e-5


# ---------------------------------------------------------------------------------------------- q8
def random_q8(n: int, k: int, gen: torch.Generator):
    q = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    scales = (torch.rand(n, generator=gen) * 0.01 + 0.001).half()
    return q, scales


def test_q8_ref_vs_float64():
    gen = torch.Generator().manual_seed(5)
    q, s = random_q8(30, 70, gen)
    x = torch.randn(2, 70, generator=gen)
    w = q.double() * s.double()[:, None]
    assert relerr(k8.q8_gemv_ref(x, q, s), x.double() @ w.T) < 1e-6
    full = x.double() @ w.T
    assert relerr(k8.q8_gemv_silu_mul_ref(x, q, s), torch.nn.functional.silu(full[:, :15]) * full[:, 15:]) < 1e-6


Q8_CASES = [
    (50, 96, 1, None, torch.float32),
    (50, 300, 3, 3, torch.float32),  # K not a multiple of the block
    (64, 520, 1, 2, torch.bfloat16),
    (17, 200, 8, 2, torch.float32),
    (1, 36, 1, 1, torch.float32),
]


@pytest.mark.parametrize("n,k,t,split_k,dtype", Q8_CASES)
def test_q8_gemv_triton(n, k, t, split_k, dtype):
    gen = torch.Generator().manual_seed(13 * n + k + t)
    q, s = random_q8(n, k, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    y = k8.q8_gemv_triton(x, q, s, out, split_k=split_k)
    assert y is out and torch.isfinite(y).all()
    assert relerr(y, k8.q8_gemv_ref(x, q, s)) < tol(dtype)
    assert counters_are_zero()


@pytest.mark.parametrize("n2,k,t,split_k,dtype", [(40, 96, 1, 1, torch.float32), (66, 300, 2, 3, torch.bfloat16)])
def test_q8_gemv_silu_mul_triton(n2, k, t, split_k, dtype):
    gen = torch.Generator().manual_seed(17 * n2 + k)
    q, s = random_q8(n2, k, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    y = k8.q8_gemv_silu_mul_triton(x, q, s, split_k=split_k)
    assert relerr(y, k8.q8_gemv_silu_mul_ref(x, q, s)) < tol(dtype)
    assert counters_are_zero()


def test_q8_dispatch():
    gen = torch.Generator().manual_seed(19)
    q, s = random_q8(12, 40, gen)
    x = torch.randn(1, 40, generator=gen)
    with backend("triton"):
        y = q8_gemv(x, q, s)
    assert relerr(y, q8_gemv(x, q, s)) < 1e-5  # default on CPU tensors: the reference


def test_dispatch_falls_back_for_many_rows():
    gen = torch.Generator().manual_seed(23)
    _, packed, scales, mins = random_q4(10, 64, 32, gen)
    q, s = random_q8(10, 64, gen)
    x = torch.randn(12, 64, generator=gen)  # 12 rows: more than the decode kernels take
    with backend("triton"):
        y4 = q4_gemv(x, packed, scales, mins, 32)
        y8 = q8_gemv(x, q, s)
    assert relerr(y4, k4.q4_gemv_ref(x, packed, scales, mins, 32)) < 1e-6
    assert relerr(y8, k8.q8_gemv_ref(x, q, s)) < 1e-6
