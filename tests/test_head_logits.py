"""The output head gives fp32 logits (bf16 logits are 1/16 apart at 8-16: rounding them flipped near-tied
greedy picks, docs/benchmarks.md session 13). On CUDA they are the fp32 accumulator, never rounded: the GEMV
kernels storing fp32 (here in the interpreter) and mm(out_dtype=) (CUDA-only cases). On CPU: fp32 math for
fp32 activations, the bf16 fast paths widened otherwise. Each linear format's ``logits`` and the model's
head."""

import pytest
import torch

from hf_ref import tiny_config
from olmo_local.kernels import gemv_q4 as k4
from olmo_local.kernels import gemv_q8 as k8
from olmo_local.model import OlmoHybridModel
from olmo_local.quant.formats import quantize_q4, quantize_q8
from olmo_local.quant.linear import DenseLinear, Q4Linear, Q8Linear, dense_logits


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def not_bf16_values(y: torch.Tensor) -> float:
    """The share of values that bf16 cannot hold (about all of them for unrounded fp32 results)."""
    return (y != y.to(torch.bfloat16).float()).float().mean().item()


@pytest.mark.parametrize("group,t,split_k,sdt", [(64, 1, 1, torch.float16), (64, 2, 3, torch.float16),
                                                  (0, 1, 2, torch.float16), (0, 1, 1, torch.float32)])
def test_q8_gemv_kernel_stores_fp32_from_bf16_input(group, t, split_k, sdt):
    """fp32 row scales: bitsandbytes int8's (the head takes the kernel for them too)."""
    gen = torch.Generator().manual_seed(3 + t)
    n, k = 48, 256
    q = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    s = (torch.rand(n, k // group if group else 1, generator=gen) * 0.01 + 0.001).to(sdt)
    s = s[:, 0].contiguous() if not group else s
    x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
    out = torch.full((t, n), float("nan"))
    y = k8.q8_gemv_triton(x, q, s, out, split_k=split_k)
    want = k8.q8_gemv_ref(x, q, s, torch.empty(t, n))  # fp32 math on the bf16 x, kept in fp32
    assert y is out and relerr(y, want) < 1e-5
    assert not_bf16_values(y) > 0.9


@pytest.mark.parametrize("tiled,split_k", [(False, 1), (False, 3), (True, 2)])
def test_q4_gemv_kernel_stores_fp32_from_bf16_input(tiled, split_k):
    gen = torch.Generator().manual_seed(11)
    n, k, g = 64, 256, 128
    d = quantize_q4(torch.randn(n, k, generator=gen) * 0.05, g)
    args = k4.q4_tile(d["qweight"], d["scales"], d["mins"], g) if tiled else (d["qweight"], d["scales"], d["mins"])
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    out = torch.full((1, n), float("nan"))
    y = k4.q4_gemv_triton(x, *args, g, out, tiled=tiled, split_k=split_k)
    want = k4.q4_gemv_ref(x, d["qweight"], d["scales"], d["mins"], g, torch.empty(1, n))
    assert y is out and relerr(y, want) < 1e-5
    assert not_bf16_values(y) > 0.9


def _fp32_of(mod, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ mod.dequantize(torch.float32).T


@pytest.mark.parametrize("rows", [1, 3])
def test_linear_logits_on_cpu(rows):
    """fp32 activations: fp32 math, exact to 1e-5. bf16 activations on CPU: the fast paths, widened to fp32
    (bf16 rounding, so only close)."""
    gen = torch.Generator().manual_seed(5)
    n, k = 700, 256
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(2, rows, k, generator=gen)
    mods = [DenseLinear(w), DenseLinear(w.to(torch.bfloat16)), Q8Linear(**quantize_q8(w, group_size=64)),
            Q8Linear(**quantize_q8(w, group_size=None)), Q4Linear(**quantize_q4(w, 128), group_size=128)]
    for mod in mods:
        for xx, bound in ((x, 1e-5), (x.to(torch.bfloat16), 1e-2)):
            y = mod.logits(xx)
            assert y.dtype == torch.float32 and y.shape == (2, rows, mod.out_features)
            assert relerr(y, _fp32_of(mod, xx)) < bound, (type(mod).__name__, xx.dtype)
            assert mod(xx).dtype == xx.dtype  # the forward itself answers in the input's dtype
    q8 = mods[2]  # grouped q8, bf16 x: the int8 op's group results summed in fp32, not rounded at the end
    assert not_bf16_values(q8.logits(x.to(torch.bfloat16))) > 0.5


def test_dense_logits_in_training_keep_the_plain_linear():
    w = torch.nn.Parameter(torch.randn(10, 8))
    x = torch.randn(3, 8, requires_grad=True)
    y = dense_logits(x, w)
    y.sum().backward()
    assert w.grad is not None and torch.allclose(y, x @ w.T)


@pytest.mark.parametrize("tied,head", [(True, None), (False, "dense"), (False, "q8")])
def test_model_head_gives_fp32_logits(tied, head):
    """Every head through OlmoHybridModel.head: fp32 logits; fp32 math in an fp32 model; in a bf16 model on CPU
    the bf16 paths' results, widened."""
    cfg = tiny_config(tie_word_embeddings=tied, vocab_size=600, hidden_size=64)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        m = OlmoHybridModel(cfg, dtype=dtype).eval()
        m.init_weights_(0)
        if head == "q8":
            m.lm_head = Q8Linear(**quantize_q8(m.lm_head.weight.detach().float(), group_size=32))
        h = torch.randn(1, 2, cfg.hidden_size).to(dtype)
        with torch.inference_mode():
            y = m.head(h)
            logits = m(torch.tensor([[5, 7, 9]]))
        w = m.embed.weight if tied else m.lm_head.dequantize(torch.float32) if head == "q8" else m.lm_head.weight
        assert y.dtype == torch.float32 and relerr(y, h.float() @ w.float().T) < bound
        assert logits.dtype == torch.float32


def test_decode_step_gives_fp32_logits():
    """The decode step (its Python path on CPU, the code the CUDA graph records) returns the head's fp32 logits,
    equal to the eager forward's."""
    from olmo_local.decode import DecodeStep
    from olmo_local.state import DecodeState

    cfg = tiny_config(vocab_size=600, hidden_size=64)
    m = OlmoHybridModel(cfg, dtype=torch.bfloat16).eval()
    m.init_weights_(0)
    st_a, st_b = (DecodeState(cfg, 32, "cpu", torch.bfloat16) for _ in range(2))
    step = DecodeStep(m, st_a, use_graph=False)
    with torch.inference_mode():
        for t in (5, 7, 9):
            a = step(t)
            b = m(torch.tensor([[t]]), st_b)[0, -1]
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.allclose(a, b, atol=2e-2, rtol=0)  # bf16 kernels' order of operations differ slightly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("kind", ["dense", "q8", "q8-rows-fp32", "q4", "dense-many"])
def test_head_logits_fp32_on_cuda(kind):
    """The CUDA paths: mm(out_dtype=fp32) for dense weights, the q8 / q4 GEMV kernels storing fp32; the 7B
    head's shape."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, k = 100352, 3840
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    rows = 5 if kind == "dense-many" else 1
    x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
    if kind.startswith("dense"):
        mod = DenseLinear(w.to(torch.bfloat16))
    elif kind == "q8":
        mod = Q8Linear(**quantize_q8(w, group_size=128))
    elif kind == "q8-rows-fp32":  # bitsandbytes int8's row scales
        d = quantize_q8(w, group_size=None)
        mod = Q8Linear(d["qweight"], d["scales"].float())
    else:
        mod = Q4Linear(**quantize_q4(w, 128), group_size=128)
    y = mod.logits(x)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert relerr(y, _fp32_of(mod, x)) < 1e-5
    assert not_bf16_values(y) > 0.9
