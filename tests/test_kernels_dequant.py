"""q4 one-pass dequantization: the Triton kernel (interpreter) against the torch reference and the
contract, the scratch buffer, and Q4Linear's prefill path."""

import pytest
import torch
from olmo_local.kernels import backend
from olmo_local.kernels import dequant as dq
from olmo_local.kernels.gemv_q4 import q4_dequantize
from olmo_local.quant.formats import dequantize_q4, pack_q4


def random_q4(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.05 + 0.005).half()
    mins = (-scales.float() * (4 + 8 * torch.rand(n, k // group, generator=gen))).half()
    return q, pack_q4(q, group), scales, mins


@pytest.mark.parametrize("n,k,group",
                         [(1, 32, 32), (7, 96, 32), (13, 192, 64), (5, 384, 128), (33, 256, 128)])
def test_triton_matches_reference_fp32(n, k, group):
    q, packed, scales, mins = random_q4(n, k, group, seed=n * 1000 + k)
    expect = torch.empty(n, k, dtype=torch.float64)
    for col in range(k):  # the contract, one column at a time
        g = col // group
        expect[:, col] = q[:, col].double() * scales[:, g].double() + mins[:, g].double()
    out = torch.full((n, k), float("nan"))
    got = dq.q4_dequantize_triton(packed, scales, mins, group, out)
    assert got is out
    ref = q4_dequantize(packed, scales, mins, group)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(out.double(), expect, rtol=1e-6, atol=1e-7)
    assert torch.allclose(dequantize_q4(packed, scales, mins, group).double(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,k,group,block_m", [(64, 256, 128, None), (192, 96, 32, 4), (128, 384, 64, 2)])
def test_triton_reads_the_tiled_layout(n, k, group, block_m):
    """The GEMV's tiled layout (slabs of 64 rows, group-major) dequantizes to the same [N, K] weight,
    with several group rows per program (block_m 2 and 4; 128 by default, spanning slabs and groups)."""
    from olmo_local.kernels.gemv_q4 import q4_tile

    _, packed, scales, mins = random_q4(n, k, group, seed=n + k)
    qt, st, mt = q4_tile(packed, scales, mins, group)
    ref = q4_dequantize(packed, scales, mins, group)
    out = torch.full((n, k), float("nan"))
    dq.q4_dequantize_triton(qt, st, mt, group, out, tiled=True, block_m=block_m)
    assert torch.equal(out, ref)
    out2 = torch.full((n, k), float("nan"))
    assert torch.equal(dq.q4_dequantize_into_ref(qt, st, mt, group, out2, tiled=True), ref)
    with pytest.raises(ValueError, match="multiple of 64"):
        dq.q4_dequantize_triton(qt[:32], st[:32], mt[:32], group, out[:32], tiled=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_m", [None, 1, 4])
def test_triton_half_outputs(dtype, block_m):
    n, k, group = 9, 256, 64
    _, packed, scales, mins = random_q4(n, k, group, seed=3)
    ref = dq.q4_dequantize_into_ref(packed, scales, mins, group, torch.empty(n, k, dtype=dtype))
    out = torch.empty(n, k, dtype=dtype)
    dq.q4_dequantize_triton(packed, scales, mins, group, out, block_m=block_m)
    # the interpreter truncates to 16 bits instead of rounding: one unit in the last place at most
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    err = (out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)
    assert err.max().item() <= ulp


def test_dispatch_and_shape_checks():
    _, packed, scales, mins = random_q4(4, 128, 32, seed=5)
    out = torch.empty(4, 128)
    with backend("triton"):
        a = dq.q4_dequantize_into(packed, scales, mins, 32, out).clone()
    with backend("torch"):
        b = dq.q4_dequantize_into(packed, scales, mins, 32, torch.empty(4, 128))
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        dq.q4_dequantize_into(packed, scales, mins, 32, torch.empty(4, 64))
    with pytest.raises(ValueError):
        dq.q4_dequantize_into(packed, scales, mins, 32, torch.empty(128, 4).T)
    with pytest.raises(ValueError):
        dq.q4_dequantize_into(packed, scales, mins, 64, out)


def test_scratch_is_shared_grown_and_fresh_on_request():
    dq.clear_scratch()
    _, p1, s1, m1 = random_q4(3, 64, 32, seed=7)
    _, p2, s2, m2 = random_q4(6, 128, 32, seed=8)
    w1 = dq.q4_dequantize_scratch(p1, s1, m1, 32, torch.float32)
    assert torch.equal(w1, q4_dequantize(p1, s1, m1, 32))
    w2 = dq.q4_dequantize_scratch(p2, s2, m2, 32, torch.float32)  # grows the buffer
    assert torch.equal(w2, q4_dequantize(p2, s2, m2, 32))
    w3 = dq.q4_dequantize_scratch(p1, s1, m1, 32, torch.float32)  # reuses it
    assert w3.data_ptr() == w2.data_ptr()
    f = dq.q4_dequantize_scratch(p1, s1, m1, 32, torch.float32, fresh=True)
    assert f.data_ptr() != w3.data_ptr() and torch.equal(f, w3)
    dq.clear_scratch()


def _q4_linear(n, k, group, seed):
    from olmo_local.quant.linear import Q4Linear

    _, packed, scales, mins = random_q4(n, k, group, seed)
    return Q4Linear(packed, scales, mins, group)


def test_prefill_composition_matches_q4linear_cpu():
    """What Q4Linear.forward does on CUDA for > 8 rows (scratch dequant in x.dtype, then F.linear),
    run here with the Triton kernel in the interpreter, against the CPU forward."""
    lin = _q4_linear(40, 256, 64, seed=11)
    x = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(0))
    with backend("triton"):
        w = dq.q4_dequantize_scratch(lin.qweight, lin.scales, lin.mins, lin.group_size, x.dtype)
        y = torch.nn.functional.linear(x, w)
    assert torch.allclose(y, lin(x), rtol=1e-5, atol=1e-5)
    dq.clear_scratch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("rows,tiled", [(1, False), (9, False), (300, False), (1, True), (300, True)])
def test_q4linear_cuda_prefill(rows, tiled):
    """Q4Linear on CUDA (decode GEMV for 1 row, scratch dequant + GEMM for more), in the standard and
    the tiled layout, against its CPU fp32 forward."""
    lin = _q4_linear(1024 if tiled else 1000, 1024, 128, seed=12)
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(1))
    ref = lin(x)  # CPU, fp32
    lin = lin.cuda()
    assert lin.tile_() == tiled
    y = lin(x.cuda().bfloat16()).float().cpu()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2
    w = dq.q4_dequantize_scratch(lin.qweight, lin.scales, lin.mins, 128, torch.bfloat16, tiled=tiled)
    exact = dq.q4_dequantize_into_ref(lin.qweight, lin.scales, lin.mins, 128, torch.empty_like(w), tiled)
    assert (w.float() - exact.float()).abs().max().item() <= 2.0 ** -7 * exact.float().abs().max().item()
    dq.clear_scratch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_q4linear_cuda_prefill_in_row_blocks(monkeypatch):
    """A layer larger than the prefill scratch is dequantized and multiplied in row blocks (the last
    one partial); the result equals the one-block GEMM up to summation order."""
    import olmo_local.quant.linear as ql

    lin = _q4_linear(1000, 1024, 128, seed=13).cuda()
    x = torch.randn(70, 1024, generator=torch.Generator().manual_seed(2)).cuda().bfloat16()
    whole = lin(x)
    tiled = _q4_linear(1024, 1024, 128, seed=13).cuda()
    assert tiled.tile_()
    tiled_whole = tiled(x)
    monkeypatch.setattr(ql, "PREFILL_SCRATCH_ELEMS", 192 * 1024)  # 192 rows per block: 6 blocks
    blocks = lin(x)
    assert blocks.shape == whole.shape == (70, 1000)
    # the same products; only cuBLAS's kernel choice for the block shape may reorder the sums
    assert ((blocks.float() - whole.float()).norm() / whole.float().norm()).item() < 1e-3
    tiled_blocks = tiled(x)  # 192-row blocks are whole 64-row slabs of the tiled layout
    assert ((tiled_blocks.float() - tiled_whole.float()).norm() / tiled_whole.float().norm()).item() < 1e-3
    dq.clear_scratch()


@pytest.mark.parametrize("groups", [None, 32])
@pytest.mark.parametrize("shape", [(1,), (2, 3)])
def test_q8_embed_matches_the_torch_form(groups, shape):
    """The q8 embedding kernel (interpreter) gives the torch form's rows, per-row and group scales, for
    ids of any shape (fp32 output: exact; bf16: within the interpreter's truncating cast)."""
    from olmo_local.kernels.embed import q8_embed_ref, q8_embed_triton

    gen = torch.Generator().manual_seed(3)
    v, d = 50, 96
    q = torch.randint(-127, 128, (v, d), generator=gen, dtype=torch.int32).to(torch.int8)
    s = (torch.rand(v, d // groups if groups else v, generator=gen) * 0.02 + 1e-3).half()
    if not groups:
        s = s[:, 0].contiguous()
    ids = torch.randint(0, v, shape, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        got = q8_embed_triton(ids, q, s, dtype, block_d=64)
        want = q8_embed_ref(ids, q, s, dtype)
        assert got.shape == (*shape, d) and got.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(got, want)
        else:
            assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7


@pytest.mark.parametrize("block_d", [64, 128])
def test_q8_embed_with_the_first_norm_folded(block_d):
    """norm_w: the embedding launch also gives x~ = x * w and the row's sums of squares per block of columns
    (one block or two), so that rstd * (x~ @ W.T) is rmsnorm(x) * w @ W.T; the kernel (interpreter, fp32)
    against the torch form, whose parts are checked against float64 here. One id only."""
    from olmo_local.kernels.embed import q8_embed, q8_embed_ref, q8_embed_triton

    gen = torch.Generator().manual_seed(5)
    v, d = 40, 96
    q = torch.randint(-127, 128, (v, d), generator=gen, dtype=torch.int32).to(torch.int8)
    s = (torch.rand(v, d // 32, generator=gen) * 0.02 + 1e-3).half()
    w = 1 + 0.3 * torch.randn(d, generator=gen)
    ids = torch.tensor([7])
    x_r, xt_r, ss_r = q8_embed_ref(ids, q, s, torch.float32, norm_w=w)
    x64 = (q[7].double().view(3, 32) * s[7].double()[:, None]).reshape(1, d)
    assert torch.allclose(x_r.double(), x64) and torch.allclose(xt_r.double(), x64 * w.double())
    assert torch.allclose(ss_r.double(), x64.pow(2).sum().reshape(1))
    x, xt, ss = q8_embed_triton(ids, q, s, torch.float32, block_d=block_d, norm_w=w)
    assert ss.numel() == -(-d // block_d)
    assert torch.equal(x, x_r) and torch.allclose(xt, xt_r) and torch.allclose(ss.sum(), ss_r[0])
    with backend("torch"):
        assert all(torch.equal(a, b) for a, b in zip(q8_embed(ids, q, s, torch.float32, norm_w=w), (x_r, xt_r, ss_r)))
    with pytest.raises(ValueError, match="one id"):
        q8_embed_triton(torch.tensor([1, 2]), q, s, torch.float32, norm_w=w)
