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
