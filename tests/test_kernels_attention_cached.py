"""Prefill attention over the KV cache with the position on the device (kernels/attention_cached.py): the
Triton kernel (interpreter) against its torch reference, and the reference against plain causal SDPA."""

import pytest
import torch
import torch.nn.functional as F

from olmo_local.kernels.attention_cached import attention_cached_ref, attention_cached_triton
from olmo_local.kernels.attention_decode import quantize_kv_int8_ref


def _case(h, kv, t, pos, hd, S, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h, t, hd, generator=g).to(dtype)
    k = torch.randn(kv, S, hd, generator=g).to(dtype)
    v = torch.randn(kv, S, hd, generator=g).to(dtype)
    return q, k, v, torch.tensor([pos], dtype=torch.int32)


@pytest.mark.parametrize("h,kv,t,pos,hd,S", [
    (2, 2, 5, 0, 16, 8),        # one short block, a fresh prompt
    (4, 2, 70, 9, 24, 90),      # GQA, head dim 24 (masked to 32), two query blocks, keys past one block
    (2, 1, 17, 130, 32, 160),   # a prompt continuing after 130 positions
    (3, 3, 1, 40, 16, 64),      # one query
])
@pytest.mark.parametrize("quant", [False, True])
def test_kernel_matches_reference(h, kv, t, pos, hd, S, quant):
    q, k, v, p = _case(h, kv, t, pos, hd, S, seed=t + pos)
    ks = vs = None
    if quant:
        k, ks = quantize_kv_int8_ref(k)
        v, vs = quantize_kv_int8_ref(v)
    want = attention_cached_ref(q, k, v, p, ks, vs)
    got = attention_cached_triton(q, k, v, p, ks, vs, block_m=64, block_n=32)
    assert got.shape == (h, t, hd)
    assert (got - want).abs().max().item() < 1e-4
    # rows past pos + t in the cache are never read
    k2, v2 = k.clone(), v.clone()
    k2[:, pos + t:] = 100 if not quant else 127
    v2[:, pos + t:] = 100 if not quant else 127
    assert (attention_cached_triton(q, k2, v2, p, ks, vs, block_m=64, block_n=32) - got).abs().max().item() < 1e-6


def test_reference_is_causal_attention_over_the_cache():
    """At position p the reference equals SDPA of the chunk's queries over keys 0..p+T-1 with the causal
    mask shifted by p (and plain causal SDPA at position 0)."""
    h, kv, t, pos, hd = 4, 2, 6, 5, 16
    q, k, v, p = _case(h, kv, t, pos, hd, 16, seed=1)
    end = pos + t
    mask = torch.arange(end)[None, :] <= (pos + torch.arange(t))[:, None]
    want = F.scaled_dot_product_attention(q[None], k[None, :, :end], v[None, :, :end], attn_mask=mask,
                                          enable_gqa=True)[0]
    assert (attention_cached_ref(q, k, v, p) - want).abs().max().item() < 1e-5
    p0 = torch.tensor([0])
    want0 = F.scaled_dot_product_attention(q[None], k[None, :, :t], v[None, :, :t], is_causal=True,
                                           enable_gqa=True)[0]
    assert (attention_cached_ref(q, k, v, p0) - want0).abs().max().item() < 1e-5


def test_rejects_bad_inputs():
    q, k, v, p = _case(3, 2, 4, 0, 16, 8, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        attention_cached_ref(q, k, v, p)
    q, k, v, p = _case(2, 2, 4, 0, 16, 8, seed=0)
    with pytest.raises(ValueError, match="int8"):
        attention_cached_triton(q, k, v, p, torch.ones(2, 8), torch.ones(2, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("t,pos,quant", [(512, 0, False), (37, 1000, False), (512, 0, True), (100, 3000, True)])
def test_kernel_on_cuda_at_the_7b_shape(t, pos, quant):
    """bf16 (tensor-core dots) and int8 caches at the 7B's 30 heads x 128, fresh and deep in a cache."""
    q, k, v, p = _case(30, 30, t, pos, 128, pos + 512, seed=t, dtype=torch.bfloat16)
    q, k, v, p = q.cuda(), k.cuda(), v.cuda(), p.cuda()
    ks = vs = None
    if quant:
        k, ks = quantize_kv_int8_ref(k)
        v, vs = quantize_kv_int8_ref(v)
    want = attention_cached_ref(q, k, v, p, ks, vs).float()
    got = attention_cached_triton(q, k, v, p, ks, vs).float()
    assert (got - want).abs().max().item() < 2e-2 * (1 + want.abs().max().item())
