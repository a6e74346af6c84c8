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


@pytest.mark.parametrize("dtype,pairs", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("gpi,split_k", [(1, 3), (2, 2), (4, 2), (4, 1)])
def test_q4_gemv_tiling_variants(dtype, pairs, gated, gpi, split_k):
    """Every math path (fp32 nibble floats; packed bf16x2 pairs for bf16 x) and several groups per
    iteration, with a group count (10) that is not a multiple of the groups per iteration, so the last
    iteration of a split has masked columns, and T = 2 rows of x."""
    gen = torch.Generator().manual_seed(5 + gpi)
    _, packed, scales, mins = random_q4(36, 320, 32, gen)
    x = torch.randn(2, 320, generator=gen).to(dtype)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    ref = k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref
    y = kern(x, packed, scales, mins, 32, split_k=split_k, block_n=16, pairs=pairs, groups_per_iter=gpi)
    assert torch.isfinite(y).all()
    assert relerr(y, ref(x, packed, scales, mins, 32)) < tol(dtype)
    assert counters_are_zero()


@pytest.mark.parametrize("prefetch", [True, False, 2, "prewait-one"])
@pytest.mark.parametrize("gated", [False, True, "quad"])
@pytest.mark.parametrize("n,split_k,block_n,warps", [(70, 3, None, 4), (32, 1, 32, 2), (16, 2, 16, 1), (100, 1, 128, 4)])
def test_q4_gemv_tensor_core_path(gated, n, split_k, block_n, warps, prefetch, monkeypatch):
    """The T = 1, bf16, group-128 path that uses mma.m16n8k16 on the GPU (the interpreter runs its
    per-lane emulation): odd N (masked rows in both row halves), split-K, several tile heights; gated
    with gate|up row pairs per program (the default) and with four tiles ("quad"); the hand prefetch
    one or two groups ahead (2; split-K then has splits shorter than the prefetch distance), one ahead
    with the first two groups loaded before the wait (True, the default: the first group peeled) or only
    the first ("prewait-one")."""
    if prefetch == "prewait-one":
        monkeypatch.setattr(k4, "PREWAIT_TWO", False)
        prefetch = True
    gen = torch.Generator().manual_seed(n + split_k)
    n_rows = 2 * n if gated else n
    _, packed, scales, mins = random_q4(n_rows, 512, 128, gen)
    x = torch.randn(1, 512, generator=gen).to(torch.bfloat16)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    ref = k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref
    halves = {} if not gated else {"gate_halves": gated is True}
    y = kern(x, packed, scales, mins, 128, split_k=split_k, block_n=block_n, num_warps=warps, mma=True,
             prefetch=bool(prefetch), prefetch_depth=2 if prefetch == 2 else 1, **halves)
    assert torch.isfinite(y).all()
    assert relerr(y, ref(x, packed, scales, mins, 128)) < tol(torch.bfloat16)
    y_fp = kern(x, packed, scales, mins, 128, split_k=split_k, mma=False)
    assert relerr(y_fp, y) < tol(torch.bfloat16)
    assert counters_are_zero()


@pytest.mark.parametrize("tiled,split_k,n_dense,folded", [(True, 3, 6, True), (False, 2, 5, False), (True, 1, 1, True),
                                                             (False, 4, 9, True)])
def test_q4_gemv_dense_rows_in_the_same_launch(tiled, split_k, n_dense, folded):
    """dense=(Wd, d): extra programs of the launch write d = x . Wd (fp32; times rstd for a folded norm's x~,
    as the GDN a|b rows next to the in-projection) for row counts that do and do not fill the last extra
    column of programs; the q4 rows are unchanged. The dispatcher's torch path computes the same."""
    gen = torch.Generator().manual_seed(split_k + n_dense)
    n, k = 256, 640
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    args = k4.q4_tile(packed, scales, mins, 128) if tiled else (packed, scales, mins)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    wd = torch.randn(n_dense, k, generator=gen).to(torch.bfloat16)
    rstd = (torch.rand(3, generator=gen) * k, 1e-6) if folded else None
    d = torch.full((n_dense,), float("nan"))
    y = k4.q4_gemv_triton(x, *args, 128, tiled=tiled, split_k=split_k, rstd=rstd, dense=(wd, d))
    want = (x.double() @ wd.double().T).reshape(-1) * float(k4._rstd(rstd, k))
    assert relerr(d, want) < 1e-6
    assert relerr(y, k4.q4_gemv_ref(x, packed, scales, mins, 128, rstd=rstd)) < tol(torch.bfloat16)
    d_ref = torch.full((n_dense,), float("nan"))
    with backend("torch"):
        k4.q4_gemv(x, *args, 128, tiled=tiled, rstd=rstd, dense=(wd, d_ref))
    assert relerr(d_ref, want) < 1e-6
    assert counters_are_zero()
    with pytest.raises(ValueError, match="dense rows"):
        k4.q4_gemv_triton(x, *args, 128, tiled=tiled, dense=(wd.float(), d))


def test_q4_tile_is_a_slab_wise_permutation():
    """q4_tile keeps every byte and scale, puts group g of each 64-row slab in one contiguous block
    (row-major within it), and q4_untile inverts it exactly."""
    gen = torch.Generator().manual_seed(3)
    _, packed, scales, mins = random_q4(128, 384, 128, gen)
    qt, st, mt = k4.q4_tile(packed, scales, mins, 128)
    assert qt.shape == packed.shape and st.shape == scales.shape and qt.is_contiguous()
    flat, sflat = qt.reshape(-1), st.reshape(-1)
    ngr, hg = 3, 64
    for slab, g, r in [(0, 0, 0), (0, 2, 5), (1, 1, 63), (1, 0, 17)]:
        block = (slab * ngr + g) * 64 + r  # group row index in memory order
        row = slab * 64 + r
        assert torch.equal(flat[block * hg:(block + 1) * hg], packed[row, g * hg:(g + 1) * hg])
        assert sflat[block] == scales[row, g] and mt.reshape(-1)[block] == mins[row, g]
    back = k4.q4_untile(qt, st, mt, 128)
    assert all(torch.equal(a, b) for a, b in zip(back, (packed, scales, mins)))
    assert torch.equal(k4.q4_dequantize(qt, st, mt, 128, tiled=True), k4.q4_dequantize(packed, scales, mins, 128))
    with pytest.raises(ValueError, match="multiple of 64"):
        k4.q4_tile(packed[:96], scales[:96], mins[:96], 128)


@pytest.mark.parametrize("gated", [False, True, "quad"])
@pytest.mark.parametrize("mma,t,group,split_k,block_n,warps", [
    (True, 1, 128, 3, None, 4),     # the decode default: tensor cores, one bf16 row
    (True, 1, 128, 1, 128, 8),      # 128-row programs span two slabs
    (True, 1, 128, 2, 32, 2),       # 32-row programs: two per slab
    (False, 2, 128, 2, 16, 4),      # fp32 path, T = 2
    (False, 3, 64, 3, 64, 4),       # another group size
])
def test_q4_gemv_tiled_layout(gated, mma, t, group, split_k, block_n, warps):
    """Every kernel path reads the tiled layout: results equal the standard layout's (same math, same
    order of sums) and the reference."""
    gen = torch.Generator().manual_seed(7 * t + group)
    n_rows = 256 if gated else 192
    _, packed, scales, mins = random_q4(n_rows, 512, group, gen)
    qt, st, mt = k4.q4_tile(packed, scales, mins, group)
    x = torch.randn(t, 512, generator=gen).to(torch.bfloat16)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    ref = k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref
    knobs = dict(split_k=split_k, block_n=block_n, num_warps=warps, mma=mma)
    if gated:
        knobs["gate_halves"] = gated is True
    y_t = kern(x, qt, st, mt, group, tiled=True, **knobs)
    y_s = kern(x, packed, scales, mins, group, **knobs)
    assert torch.equal(y_t, y_s)
    assert relerr(y_t, ref(x, packed, scales, mins, group)) < tol(torch.bfloat16)
    assert torch.equal(ref(x, qt, st, mt, group, tiled=True), ref(x, packed, scales, mins, group))
    assert torch.equal(k4.q4_gemv(x, qt, st, mt, group, tiled=True) if not gated else
                       k4.q4_gemv_silu_mul(x, qt, st, mt, group, tiled=True),
                       (k4.q4_gemv if not gated else k4.q4_gemv_silu_mul)(x, packed, scales, mins, group))
    assert counters_are_zero()


def test_q4_tiled_layout_needs_whole_slabs():
    gen = torch.Generator().manual_seed(2)
    _, packed, scales, mins = random_q4(96, 256, 128, gen)  # gate|up halves of 48 rows
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        k4.q4_gemv_silu_mul_triton(x, packed, scales, mins, 128, tiled=True)


def test_q4_tensor_core_path_rejects_what_it_cannot_do():
    gen = torch.Generator().manual_seed(1)
    _, packed, scales, mins = random_q4(16, 256, 64, gen)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="group size 128"):
        k4.q4_gemv_triton(x, packed, scales, mins, 64, mma=True)
    _, packed, scales, mins = random_q4(64, 256, 128, gen)
    with pytest.raises(ValueError, match="16 \\* num_warps"):
        k4.q4_gemv_triton(x, packed, scales, mins, 128, mma=True, block_n=32, num_warps=4)


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


# q8 with group scales [N, K/G]: one scale per group of G input columns
def random_q8_groups(n: int, k: int, group: int, gen: torch.Generator):
    q = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.01 + 0.001).half()
    return q, scales


def test_q8_group_ref_vs_float64():
    gen = torch.Generator().manual_seed(29)
    n, k, group = 30, 96, 32
    q, s = random_q8_groups(n, k, group, gen)
    w = torch.empty(n, k, dtype=torch.float64)
    for col in range(k):  # contracts.md: w = q * scales[n, k // G]
        w[:, col] = q[:, col].double() * s[:, col // group].double()
    x = torch.randn(2, k, generator=gen)
    assert relerr(k8.q8_gemv_ref(x, q, s), x.double() @ w.T) < 1e-6
    full = x.double() @ w.T
    assert relerr(k8.q8_gemv_silu_mul_ref(x, q, s), torch.nn.functional.silu(full[:, :15]) * full[:, 15:]) < 1e-6


Q8_GROUP_CASES = [  # n, k, group, t, split_k, block_k, dtype
    (40, 256, 64, 1, 1, None, torch.float32),
    (34, 384, 128, 3, 3, None, torch.bfloat16),  # 2 blocks per group, splits inside groups
    (24, 512, 128, 1, 2, 256, torch.bfloat16),  # block_k above G: one group per block
    (20, 96, 32, 8, 2, None, torch.float32),
    (17, 128, 16, 2, 1, None, torch.float16),
    (4160, 256, 128, 1, 1, None, torch.bfloat16),  # tall (>= 4 blocks of 128 rows per nominal SM): 128-row blocks
]


@pytest.mark.parametrize("n,k,group,t,split_k,block_k,dtype", Q8_GROUP_CASES)
def test_q8_group_gemv_triton(n, k, group, t, split_k, block_k, dtype):
    gen = torch.Generator().manual_seed(31 * n + k + t)
    q, s = random_q8_groups(n, k, group, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    y = k8.q8_gemv_triton(x, q, s, out, split_k=split_k, block_k=block_k)
    assert y is out and torch.isfinite(y).all()
    ref = k8.q8_gemv_ref(x, q, s)
    assert relerr(y, ref) < tol(dtype)
    # the group scales are really used: one scale per row (the first group's) gives another result
    assert relerr(k8.q8_gemv_ref(x, q, s[:, 0].contiguous()), ref) > 0.05
    assert counters_are_zero()


@pytest.mark.parametrize("n2,k,group,t,split_k,dtype", [(40, 192, 64, 2, 3, torch.bfloat16),
                                                         (66, 256, 32, 1, 1, torch.float32)])
def test_q8_group_gemv_silu_mul_triton(n2, k, group, t, split_k, dtype):
    gen = torch.Generator().manual_seed(37 * n2 + k)
    q, s = random_q8_groups(n2, k, group, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    y = k8.q8_gemv_silu_mul_triton(x, q, s, split_k=split_k)
    assert y.shape == (t, n2 // 2) and y.dtype == dtype
    assert relerr(y, k8.q8_gemv_silu_mul_ref(x, q, s)) < tol(dtype)
    assert counters_are_zero()


def test_q8_group_dispatch_and_unsupported_groups():
    gen = torch.Generator().manual_seed(41)
    q, s = random_q8_groups(12, 64, 32, gen)
    x = torch.randn(64, generator=gen)
    with backend("triton"):
        y = q8_gemv(x, q, s)
    assert y.shape == (12,) and relerr(y, k8.q8_gemv_ref(x, q, s)) < 1e-5
    q, s = random_q8_groups(12, 72, 24, gen)  # G = 24 is not a power of two: the reference runs
    x = torch.randn(1, 72, generator=gen)
    with backend("triton"):
        y = q8_gemv(x, q, s)
    assert relerr(y, k8.q8_gemv_ref(x, q, s)) < 1e-6
    with pytest.raises(ValueError, match="scales"):
        k8.q8_gemv_triton(x, q, s)


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


@pytest.mark.parametrize("cap", [(9, 0), (8, 6)])
@pytest.mark.parametrize("gated", [False, True])
def test_q4_wide_programs_give_the_same_result(gated, cap, monkeypatch):
    """The wide-program launch rule (64 rows per warp on Hopper, 32 below it; split-K by programs per SM; the
    default) changes the tiling, not the result: with and without it the tiled tensor-core path matches the
    reference."""
    monkeypatch.setattr(k4, "capability", lambda device: cap)
    rows = k4._wide_launch(gated, torch.device("cpu"))[0]
    assert rows == (64 if cap[0] >= 9 else 32)
    gen = torch.Generator().manual_seed(5)
    n, k = (512, 256) if gated else (1024, 256)
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    qt, st, mt = k4.q4_tile(packed, scales, mins, 128)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    ref = k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref
    for rules in (True, False):
        monkeypatch.setattr(k4, "WIDE_PROGRAMS", rules)
        y = kern(x, qt, st, mt, 128, tiled=True)
        assert relerr(y, ref(x, packed, scales, mins, 128)) < tol(torch.bfloat16)
        assert torch.equal(kern(x, packed, scales, mins, 128), y)  # the standard layout: same sums
        assert counters_are_zero()


def test_wide_split_stays_within_one_wave():
    """The wide programs' split count at the 7B shapes on a 132-SM card: every launch fits 2 programs
    per SM at once (rounding to the nearest split count gave gdn_in, qkv and down 270-272 programs for
    264 places, a few of them a second wave), and still fills at least 3/4 of the places."""
    sms, per_sm = 132, 2.0
    for rows, k in ((17280, 3840), (11520, 3840), (11008 * 2, 3840), (3840, 11008), (3840, 5760), (3840, 3840)):
        n_blocks = -(-(rows // 2 if rows == 11008 * 2 else rows) // (128 if rows == 11008 * 2 else 256))
        iters = k // 128
        split = k4._wide_split(n_blocks, iters, sms, per_sm)
        split = -(-iters // -(-iters // split))  # as the launch does: whole groups per split, none empty
        assert 0.75 * per_sm * sms <= n_blocks * split <= per_sm * sms, (rows, k, split)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mma,t", [(True, 1), (False, 1), (False, 3)])
def test_q4_split_k_reduction_tree_matches_the_loop(gated, mma, t, monkeypatch):
    """The split-K partials added by one [SPLITP, BN] load and a reduction tree (5 splits: a masked
    power-of-two tile) give the sums of the loop over splits, both equal to the reference."""
    gen = torch.Generator().manual_seed(11 + t)
    n, k = (128, 1280) if gated else (96, 1280)
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
    kern = k4.q4_gemv_silu_mul_triton if gated else k4.q4_gemv_triton
    want = (k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref)(x, packed, scales, mins, 128)
    got = []
    for tree_max in (64, 0):
        monkeypatch.setattr(k4, "SPLITK_TREE_MAX", tree_max)
        got.append(kern(x, packed, scales, mins, 128, split_k=5, mma=mma, block_n=64 if mma else None,
                        num_warps=4 if mma else None))
        assert relerr(got[-1], want) < tol(torch.bfloat16)
        assert counters_are_zero()
    assert relerr(got[0], got[1]) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("rules", [True, False])
@pytest.mark.parametrize("name,n,k,gated", [("gdn_in", 17280, 3840, False), ("gate_up", 2 * 11008, 3840, True),
                                            ("down", 3840, 11008, False), ("attn_o", 3840, 3840, False)])
def test_q4_default_launch_at_7b_shapes_on_cuda(name, n, k, gated, rules, monkeypatch):
    """The decode launches as the model makes them (no knobs: tensor cores, tiled layout, the wide-program
    rule or the older 16-rows-per-warp default) against the dequantized reference at the 7B shapes."""
    monkeypatch.setattr(k4, "WIDE_PROGRAMS", rules)
    gen = torch.Generator().manual_seed(13)
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    packed, scales, mins = (t.cuda() for t in k4.q4_tile(packed, scales, mins, 128))
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    kern = k4.q4_gemv_silu_mul if gated else k4.q4_gemv
    ref = (k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref)(x.float(), packed, scales, mins, 128, tiled=True)
    for _ in range(3):  # repeated launches reuse the split-K workspaces and counters
        got = kern(x, packed, scales, mins, 128, tiled=True)
        assert relerr(got.float(), ref) < 1e-2, name
    assert counters_are_zero()


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("consumer,csplit,preload", [("plain", 1, True), ("plain", 2, False), ("gated", 1, False),
                                                     ("gated", 2, True)])
def test_q4_folded_norm_equals_gemv_then_norm_then_gemv(norm, consumer, csplit, preload, monkeypatch):
    """A folded norm: the producer GEMV's split-K tail writes x_new = residual + y (and, with the norm
    weight, x~ = x_new * w and its row blocks' sums of squares), and the consumer GEMV scales its rows
    by rstd from those sums. Kernels (tensor-core path, interpreter) against the fold's reference, and
    the reference against the unfused ops: GEMV, add_rmsnorm (or the residual add), GEMV. preload: the
    producer's residual and weight rows loaded at its start (FOLD_PRELOAD) or in its tail."""
    from olmo_local.kernels.norm import add_rmsnorm_ref, residual_add_ref

    monkeypatch.setattr(k4, "FOLD_PRELOAD", preload)

    gen = torch.Generator().manual_seed(21 + norm)
    d, k1, n2 = 384, 512, 256  # hidden 384 = 3 row blocks of 128 (block_n 128, 2 warps) in the producer
    _, p1, s1, m1 = random_q4(d, k1, 128, gen)
    _, p2, s2, m2 = random_q4(2 * n2 if consumer == "gated" else n2, d, 128, gen)
    p1, s1, m1 = k4.q4_tile(p1, s1, m1, 128)
    p2, s2, m2 = k4.q4_tile(p2, s2, m2, 128)
    x = torch.randn(1, k1, generator=gen).to(torch.bfloat16)
    res = (torch.randn(1, d, generator=gen) * 4).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(d, generator=gen)).to(torch.bfloat16) if norm else None
    eps = 1e-6
    cons, cons_ref = ((k4.q4_gemv_silu_mul_triton, k4.q4_gemv_silu_mul_ref) if consumer == "gated" else
                      (k4.q4_gemv_triton, k4.q4_gemv_ref))
    # unfused: GEMV, the norm op, GEMV
    y = k4.q4_gemv_ref(x, p1, s1, m1, 128, tiled=True)
    if norm:
        u, xn_want = add_rmsnorm_ref(y, res, w, eps)
    else:
        xn_want = u = residual_add_ref(y, res)
    want = cons_ref(u, p2, s2, m2, 128, tiled=True)
    # the fold's reference
    xn_r, xt_r, ss_r = k4.q4_gemv_fold_ref(x, p1, s1, m1, 128, res, w, tiled=True)
    assert torch.equal(xn_r, xn_want)
    got_r = cons_ref(xt_r if norm else xn_r, p2, s2, m2, 128, tiled=True, rstd=(ss_r, eps) if norm else None)
    assert relerr(got_r, want) < 1e-2
    # the kernels
    xn, xt, ss = k4._q4_launch(x, p1, s1, m1, 128, None, False, True, fold=(res, w), block_n=128, num_warps=2,
                               split_k=2)
    assert relerr(xn, xn_r) < 1e-2
    if norm:
        assert ss.numel() == 3 and torch.allclose(ss.sum(), ss_r[0], rtol=1e-2)
        assert relerr(xt, xt_r) < 1e-2
    got = cons(xt if norm else xn, p2, s2, m2, 128, tiled=True, rstd=(ss, eps) if norm else None, block_n=64,
               num_warps=2, split_k=csplit)
    assert relerr(got, want) < 2e-2
    assert counters_are_zero()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("producer_k,consumer_n,gated", [(5760, 2 * 11008, True), (11008, 17280, False)])
def test_q4_folded_norm_at_7b_shapes_on_cuda(producer_k, consumer_n, gated):
    """The folded norm as the decode step launches it at the 7B shapes (GDN o -> gate|up, down -> the
    in-projection): the default launch rules, against GEMV, add_rmsnorm, GEMV in fp32."""
    from olmo_local.kernels.norm import add_rmsnorm_ref

    gen = torch.Generator().manual_seed(17)
    d = 3840
    p1, s1, m1 = (t.cuda() for t in k4.q4_tile(*random_q4(d, producer_k, 128, gen)[1:], 128))
    p2, s2, m2 = (t.cuda() for t in k4.q4_tile(*random_q4(consumer_n, d, 128, gen)[1:], 128))
    x = torch.randn(1, producer_k, generator=gen).to(torch.bfloat16).cuda()
    res = (torch.randn(1, d, generator=gen) * 4).to(torch.bfloat16).cuda()
    w = (1 + 0.2 * torch.randn(d, generator=gen)).to(torch.bfloat16).cuda()
    y = k4.q4_gemv_ref(x, p1, s1, m1, 128, tiled=True)
    u, xn_want = add_rmsnorm_ref(y, res, w, 1e-6)
    cons = k4.q4_gemv_silu_mul if gated else k4.q4_gemv
    want = (k4.q4_gemv_silu_mul_ref if gated else k4.q4_gemv_ref)(u.float(), p2, s2, m2, 128, tiled=True)
    for _ in range(3):  # repeated launches reuse the workspaces and counters
        xn, xt, ss = k4.q4_gemv_fold(x, p1, s1, m1, 128, res, w, tiled=True)
        assert relerr(xn, xn_want) < 1e-2
        got = cons(xt, p2, s2, m2, 128, tiled=True, rstd=(ss, 1e-6))
        assert relerr(got.float(), want) < 2e-2
    assert counters_are_zero()


@pytest.mark.parametrize("tiled,split_k,nconv,folded", [(True, 3, 200, True), (False, 1, 256, False),
                                                         (True, 2, 37, False), (False, 4, 130, True)])
def test_q4_conv_epilogue_matches_the_conv_reference(tiled, split_k, nconv, folded):
    """conv=(Wc, state, act): the first C output rows (rounded to bf16, as stored) also go through one token
    of the short causal conv + SiLU (fp32 act) and the conv state shifts to end with them; split-K (in the
    last program's tail) and one split (right after the rows are stored), C a whole or a partial row block.
    Against the step written here in float64, and the dispatcher's torch path against the same."""
    gen = torch.Generator().manual_seed(nconv + split_k)
    n, k, kc = 256, 640, 4
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    args = k4.q4_tile(packed, scales, mins, 128) if tiled else (packed, scales, mins)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    cw = torch.randn(nconv, kc, generator=gen).to(torch.bfloat16)
    state0 = torch.randn(nconv, kc - 1, generator=gen).to(torch.bfloat16)
    rstd = (torch.rand(3, generator=gen) * k, 1e-6) if folded else None
    y_want = k4.q4_gemv_ref(x, packed, scales, mins, 128, rstd=rstd)
    for run in ("kernel", "torch"):
        state = state0.clone()
        act = torch.full((nconv,), float("nan"))
        if run == "kernel":
            y = k4.q4_gemv_triton(x, *args, 128, tiled=tiled, split_k=split_k, rstd=rstd, conv=(cw, state, act))
        else:
            with backend("torch"):
                y = k4.q4_gemv(x, *args, 128, tiled=tiled, rstd=rstd, conv=(cw, state, act))
        assert relerr(y, y_want) < tol(torch.bfloat16)
        yc = y.reshape(-1)[:nconv].double()  # the conv reads the stored (rounded) outputs
        win = torch.cat([state0.double(), yc[:, None]], dim=1)
        want = torch.nn.functional.silu((win * cw.double()).sum(1))
        assert relerr(act, want) < 1e-5, run
        assert torch.equal(state, win[:, 1:].to(torch.bfloat16)), run
    assert counters_are_zero()
    with pytest.raises(ValueError, match="conv"):
        k4.q4_gemv_triton(x, *args, 128, tiled=tiled, conv=(cw, state0.clone(), act.double()))


@pytest.mark.parametrize("heads,nvb,split_k,fold", [(4, 3, 2, False), (2, 1, 1, True), (6, 4, 3, True), (8, 2, 1, False)])
def test_q4_head_rstd_scales_each_head_of_x(heads, nvb, split_k, fold):
    """head_rstd=(hs [H, B], eps): x holds H heads without their RMSNorm scale; the kernel scales each half
    group by its head's rsqrt(sum(hs[h]) / dv + eps) (dv 64 or a multiple) and rounds to bf16 before the
    products, plain and as a fold's producer (the GDN o projection). Against x scaled in float64 then the
    reference GEMV, and the dispatcher's torch path."""
    gen = torch.Generator().manual_seed(heads * 10 + nvb)
    k = 384 if heads in (6,) else 512
    dv = k // heads
    n = 256
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    args = k4.q4_tile(packed, scales, mins, 128)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    hs = torch.rand(heads, nvb, generator=gen) * dv * (0.2 + 4 * torch.rand(heads, 1, generator=gen))
    eps = 1e-5
    rs = torch.rsqrt(hs.double().sum(1) / dv + eps).repeat_interleave(dv)
    xs = (x.double() * rs).to(torch.bfloat16)
    assert not torch.equal(xs, x)
    if fold:
        res = torch.randn(1, n, generator=gen).to(torch.bfloat16)
        w = (1 + 0.2 * torch.randn(n, generator=gen)).to(torch.bfloat16)
        want = k4.q4_gemv_fold_ref(xs, packed, scales, mins, 128, res, w)
        got = k4._q4_launch(x, *args, 128, None, False, True, fold=(res, w), split_k=max(split_k, 2),
                            head_rstd=(hs, eps))
        with backend("torch"):
            got_t = k4.q4_gemv_fold(x, *args, 128, res, w, tiled=True, head_rstd=(hs, eps))
        for g_, t_, w_ in zip(got[:2], got_t[:2], want[:2]):
            assert relerr(g_, w_) < 2e-2 and relerr(t_, w_) < 1e-2
        assert torch.allclose(got[2].sum(), want[2][0], rtol=2e-2)
    else:
        want = k4.q4_gemv_ref(xs, packed, scales, mins, 128)
        got = k4.q4_gemv_triton(x, *args, 128, tiled=True, split_k=split_k, head_rstd=(hs, eps))
        assert relerr(got, want) < tol(torch.bfloat16)
        with backend("torch"):
            assert relerr(k4.q4_gemv(x, *args, 128, tiled=True, head_rstd=(hs, eps)), want) < 1e-2
        plain = k4.q4_gemv_ref(x, packed, scales, mins, 128)
        assert relerr(plain, want) > 5 * relerr(got, want)  # the scaling is really applied
    assert counters_are_zero()
    with pytest.raises(ValueError, match="head_rstd"):
        k4.q4_gemv_triton(x, *args, 128, tiled=True, head_rstd=(torch.ones(5, 1), eps))  # 5 heads do not divide K


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("split_k", [None, 2, 5])
@pytest.mark.parametrize("nq,nk", [(128, 64), (100, 90), (0, 256), (256, 0)])
def test_q4_row_sums_give_the_q_and_k_sums_of_squares(tiled, split_k, nq, nk):
    """row_sums=(nq, nk): each row block's tail also writes the sums of squares of its stored (bf16) rows below
    nq and in [nq, nq + nk) (row blocks that straddle either bound included); their column sums equal those
    of the rows as returned, for the kernel (split-K; one split asked for still splits) and the torch path."""
    gen = torch.Generator().manual_seed(nq + 3 * nk + (split_k or 0))
    n, k = 384, 640
    _, packed, scales, mins = random_q4(n, k, 128, gen)
    args = k4.q4_tile(packed, scales, mins, 128) if tiled else (packed, scales, mins)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    y_want = k4.q4_gemv_ref(x, packed, scales, mins, 128)
    for run in ("kernel", "torch"):
        if run == "kernel":
            y, ss = k4.q4_gemv_triton(x, *args, 128, tiled=tiled, split_k=split_k, row_sums=(nq, nk))
        else:
            with backend("torch"):
                y, ss = k4.q4_gemv(x, *args, 128, tiled=tiled, row_sums=(nq, nk))
        assert relerr(y, y_want) < tol(torch.bfloat16)
        yf = y.reshape(-1).double()
        want = torch.stack([yf[:nq].square().sum(), yf[nq:nq + nk].square().sum()])
        assert ss.dtype == torch.float32 and ss.shape[1] == 2, run
        assert torch.allclose(ss.double().sum(0), want, rtol=1e-5, atol=1e-6), (run, ss.sum(0), want)
    assert counters_are_zero()
    with pytest.raises(ValueError, match="row_sums"):
        k4.q4_gemv_triton(x, *args, 128, tiled=tiled, row_sums=(300, 100))
