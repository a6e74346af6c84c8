"""The one-launch sampler (kernels/sample.py) against generate.sampling_probs and the exponential race:
the kernel's final probabilities, and its id given the same uniforms, in the interpreter; the draws'
frequencies; seeds and the step counter; on CUDA the same checks at the 7B vocabulary."""

import pytest
import torch
from olmo_local.kernels import sample as ks


def run(logits, t, top_p, min_p, seed=1, step=0, candidates=None):
    dev = logits.device
    n = logits.numel()
    rng = torch.tensor([seed, step], dtype=torch.int64, device=dev)
    out_id = torch.zeros(1, dtype=torch.int64, device=dev)
    tok = torch.zeros(1, dtype=torch.int64, device=dev)
    dp = torch.zeros(n, dtype=torch.float32, device=dev)
    du = torch.zeros(n, dtype=torch.float32, device=dev)
    ks.sample_triton(logits, t, top_p, min_p, rng, out_id, tok, debug=(dp, du), candidates=candidates)
    return int(out_id), int(tok), dp, du, rng


def peaked(n: int, seed: int, scale: float = 4.0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("n,t,top_p,min_p,candidates", [
    (3000, 0.7, 1.0, 0.0, None),     # temperature only: the race over all tokens
    (3000, 0.6, 0.95, 0.0, None),    # the chat's default: fast path (candidates)
    (2500, 1.0, 0.9, 0.05, None),    # top-p and min-p
    (3000, 0.8, 0.95, 0.0, 16),      # more candidates than slots: the slow path over all logits
    (1000, 1.3, 0.5, 0.02, 32),      # slow path with min-p
    (700, 0.9, 1.0, 0.1, None),      # min-p alone, one partial chunk
])
def test_sample_matches_sampling_probs_and_the_race(n, t, top_p, min_p, candidates):
    logits = peaked(n, seed=n)
    i, tok, dp, du, rng = run(logits, t, top_p, min_p, seed=5, candidates=candidates)
    ref_id, probs = ks.sample_ref(logits, t, top_p, min_p, du)
    support, ref_support = dp > 0, probs > 0
    assert torch.equal(support, ref_support)  # the same kept set
    assert torch.allclose(dp, probs, rtol=1e-4, atol=1e-7)
    assert i == ref_id and tok == i  # the same draw for the same uniforms; the token buffer too
    assert int(rng[1]) == 1  # the step counter moved
    assert 0.0 < float(du.min()) and float(du.max()) < 1.0
    if top_p < 1.0:
        assert int(support.sum()) < n  # top-p really dropped tokens


def test_sample_fast_and_slow_paths_agree():
    logits = peaked(4000, seed=11)
    a = run(logits, 0.7, 0.9, 0.0, seed=3)
    b = run(logits, 0.7, 0.9, 0.0, seed=3, candidates=8)
    assert a[0] == b[0] and torch.equal(a[2] > 0, b[2] > 0)
    assert torch.allclose(a[2], b[2], rtol=1e-5, atol=1e-8)


def test_sample_seeds_and_steps():
    logits = peaked(1500, seed=2, scale=1.0)
    same = [run(logits, 1.0, 1.0, 0.0, seed=9, step=s)[0] for s in (0, 0)]
    assert same[0] == same[1]  # a seed and step repeat the draw
    draws = {run(logits, 1.0, 1.0, 0.0, seed=9, step=s)[0] for s in range(8)}
    assert len(draws) > 1  # the step changes it
    other = {run(logits, 1.0, 1.0, 0.0, seed=s, step=0)[0] for s in range(8)}
    assert len(other) > 1  # and so does the seed


def test_sample_frequencies_follow_the_probabilities():
    # 6 live tokens (the rest at -inf-like logits): 300 draws, each id's share near its probability
    logits = torch.full((64,), -30.0)
    logits[:6] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    probs = torch.softmax(logits, 0)[:6]
    counts = torch.zeros(64)
    for s in range(300):
        counts[run(logits, 1.0, 1.0, 0.0, seed=123, step=s)[0]] += 1
    freq = counts[:6] / 300
    assert counts[6:].sum() == 0
    assert float((freq - probs).abs().max()) < 0.08  # 300 draws: a few standard errors (~0.03)


def test_sample_fits():
    assert ks.sample_fits(torch.zeros(10), 0)
    assert not ks.sample_fits(torch.zeros(10), 40)  # top-k keeps the torch form
    assert not ks.sample_fits(torch.zeros(2, 10), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("top_p,min_p,candidates", [(0.95, 0.0, None), (1.0, 0.0, None), (0.9, 0.05, 64)])
def test_sample_on_cuda_at_the_7b_vocabulary(top_p, min_p, candidates):
    logits = peaked(100352, seed=4, scale=3.0).cuda()
    i, tok, dp, du, rng = run(logits, 0.6, top_p, min_p, seed=8, candidates=candidates)
    ref_id, probs = ks.sample_ref(logits, 0.6, top_p, min_p, du)
    assert torch.equal(dp > 0, probs > 0)
    assert torch.allclose(dp, probs, rtol=1e-4, atol=1e-7)
    assert i == ref_id == tok and int(rng[1]) == 1
