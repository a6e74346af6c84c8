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


def _run_ptx(text: str, operands: list[int]) -> list[int]:
    """A tiny evaluator for the and / or / shr / prmt PTX of kn._LOOKUP_PTX (b32 registers, default prmt mode
    without sign replication: every selector field used has bit 3 clear)."""
    regs = {f"${i}": v for i, v in enumerate(operands)}

    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        a = [val(t) for t in src]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":
            pool = [(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)]
            assert all(((a[2] >> (4 * i)) & 8) == 0 for i in range(4)), "sign-replicate mode not expected"
            r = sum(pool[(a[2] >> (4 * i)) & 7] << (8 * i) for i in range(4))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(2)]


@pytest.mark.parametrize("code", [NF4_CODE, torch.linspace(-6, 6, 16)])  # nf4 and another table
def test_register_lookup_ptx_gives_each_nibbles_bf16_table_value(code):
    """The register lookup's PTX (run by a small evaluator of its and / or / shr / prmt lines) with the
    byte tables of _byte_tables: every word's 8 nibbles come out as the bf16 of their table entries, in
    the pairs the kernel multiplies with x (pair j: element 2j low, 2j + 1 high)."""
    tables = [t & 0xFFFFFFFF for t in kn._byte_tables(code)]
    want_bits = code.to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    gen = torch.Generator().manual_seed(9)
    words = torch.randint(0, 1 << 32, (200,), generator=gen, dtype=torch.int64).tolist() + [0, 0xFFFFFFFF, 0x01234567]
    for w in words:
        # as the kernel calls it: bytes 0, 1 of the word, then the word shifted right by 16 (arithmetic)
        signed = w - (1 << 32) if w >= 1 << 31 else w
        pairs = (_run_ptx(kn._LOOKUP_PTX, [0, 0, w, *tables])
                 + _run_ptx(kn._LOOKUP_PTX, [0, 0, (signed >> 16) & 0xFFFFFFFF, *tables]))
        for j, p in enumerate(pairs):
            byte = (w >> (8 * j)) & 0xFF
            assert p & 0xFFFF == int(want_bits[byte >> 4]) and p >> 16 == int(want_bits[byte & 15]), (hex(w), j)
