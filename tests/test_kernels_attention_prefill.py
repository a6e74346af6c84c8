"""Prefill attention over an int8 KV cache, block by block (kernels/attention_prefill.py), against
one SDPA call over the whole dequantized cache."""

import pytest
import torch

from olmo_local.kernels import attention_prefill as ap
from olmo_local.kernels.attention_decode import quantize_kv_int8


def _case(h, kv, t, pos, hd, gen):
    q = torch.randn(1, h, t, hd, generator=gen)
    cap = pos + t + 7  # cache rows past pos + t hold garbage that must not be read
    kq, ks = quantize_kv_int8(torch.randn(kv, cap, hd, generator=gen) * 3)
    vq, vs = quantize_kv_int8(torch.randn(kv, cap, hd, generator=gen))
    return q, kq, ks, vq, vs


@pytest.mark.parametrize("h,kv,t,pos,block", [
    (4, 4, 5, 37, 8),     # several blocks, the last one partial
    (6, 2, 3, 16, 16),    # GQA, one exact block
    (2, 2, 1, 50, 1024),  # decode-like single query, one block larger than the prefix
    (3, 3, 9, 1, 4),      # a prefix of one position
])
def test_blockwise_matches_one_sdpa_call(h, kv, t, pos, block):
    gen = torch.Generator().manual_seed(h * 100 + pos)
    args = _case(h, kv, t, pos, 16, gen)
    got = ap.attention_over_int8_cache(*args, pos, block=block)
    ref = ap._sdpa_reference(*args, pos)
    assert got.shape == ref.shape == (1, h, t, 16)
    assert (got - ref).abs().max().item() < 1e-5


def test_garbage_past_the_prefix_is_not_read():
    gen = torch.Generator().manual_seed(3)
    q, kq, ks, vq, vs = _case(2, 2, 4, 20, 8, gen)
    a = ap.attention_over_int8_cache(q, kq, ks, vq, vs, 20, block=6)
    ks2, vs2 = ks.clone(), vs.clone()
    ks2[:, 24:] = 1e6
    vs2[:, 24:] = float("nan")
    b = ap.attention_over_int8_cache(q, kq, ks2, vq, vs2, 20, block=6)
    assert torch.equal(a, b)


def test_merge_of_two_halves_equals_attention_over_all_keys():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 3, 5, 8, generator=gen)
    k = torch.randn(1, 3, 12, 8, generator=gen)
    v = torch.randn(1, 3, 12, 8, generator=gen)
    o1, l1 = ap.attend_ref(q, k[:, :, :7], v[:, :, :7], causal=False)
    o2, l2 = ap.attend_ref(q, k[:, :, 7:], v[:, :, 7:], causal=False)
    o, lse = ap.merge(o1, l1, o2, l2)
    ref, ref_lse = ap.attend_ref(q, k, v, causal=False)
    assert torch.allclose(o, ref, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-5)
