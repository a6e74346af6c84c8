import torch

from olmo_local.generate import Sampler, SamplingParams


def _draws(params, logits, n=400):
    s = Sampler(params)
    return [s(logits, []) for _ in range(n)]


def test_greedy_and_seed():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=0))(logits, []) == int(logits.argmax())
    a = _draws(SamplingParams(temperature=1.0, seed=5), logits, 50)
    b = _draws(SamplingParams(temperature=1.0, seed=5), logits, 50)
    c = _draws(SamplingParams(temperature=1.0, seed=6), logits, 50)
    assert a == b and a != c


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2, seed=0), logits)) == {0, 1}
    # probs ~ [.66,.24,.09,...]: top_p .8 keeps {0,1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0), logits)) == {0, 1}
    # min_p .2: keep tokens with p >= .2 * p_max -> {0,1}
    assert set(_draws(SamplingParams(temperature=1.0, min_p=0.2, seed=0), logits)) == {0, 1}


def test_repeat_penalty_and_padding_mask():
    logits = torch.tensor([3.0, 2.9, -1.0, 10.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5), n_valid=3)
    assert s(logits, []) == 0          # id 3 is vocabulary padding: never sampled
    assert s(logits, [0]) == 1         # 3/1.5 = 2 < 2.9


def test_exponential_race_draws_from_sampling_probs():
    """The CUDA-graph sampler draws argmax(p / E), E ~ Exp(1) i.i.d.: that picks id i with probability
    p_i (the exponential race); checked against sampling_probs on many draws, zeros never drawn."""
    import torch

    from olmo_local.generate import SamplingParams, sampling_probs

    logits = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9, -3.0])
    p = sampling_probs(logits, SamplingParams(temperature=0.8, top_k=4))
    assert (p > 0).sum() == 4 and abs(float(p.sum()) - 1) < 1e-6
    gen = torch.Generator().manual_seed(0)
    n = 40000
    e = torch.empty(n, 6).exponential_(generator=gen)
    ids = torch.argmax(p[None, :] / e, dim=1)
    freq = torch.bincount(ids, minlength=6).double() / n
    assert torch.allclose(freq, p.double(), atol=0.01)
    assert freq[p == 0].sum() == 0


def test_sampling_probs_is_what_the_sampler_draws_from():
    """Sampler.probs (padding ids masked) and the Sampler's own draw use the same distribution:
    with one id holding all the mass after top-k 1, both pick it."""
    import torch

    from olmo_local.generate import Sampler, SamplingParams

    logits = torch.tensor([0.1, 3.0, 2.9, 5.0, -1.0])
    sp = SamplingParams(temperature=1.0, top_k=1)
    probs = Sampler.probs(logits, sp, n_valid=3)  # id 3 is padding: the best valid id is 1
    assert probs.argmax() == 1 and float(probs[1]) == 1.0
    assert Sampler(sp, n_valid=3)(logits, []) == 1
