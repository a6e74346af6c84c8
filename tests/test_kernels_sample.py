"""The one-launch sampler (kernels/sample.py) against generate.sampling_probs and the exponential race:
the kernel's final probabilities, and its id given the same uniforms, in the interpreter; the draws'
frequencies; seeds and the step counter; on CUDA the same checks at the 7B vocabulary."""

import pytest
import torch
from olmo_local.kernels import sample as ks


def run(logits, t, top_p, min_p, seed=1, step=0, block=None):
    dev = logits.device
    n = logits.numel()
    rng = torch.tensor([seed, step], dtype=torch.int64, device=dev)
    out_id = torch.zeros(1, dtype=torch.int64, device=dev)
    tok = torch.zeros(1, dtype=torch.int64, device=dev)
    dp = torch.zeros(n, dtype=torch.float32, device=dev)
    du = torch.zeros(n, dtype=torch.float32, device=dev)
    ks.sample_triton(logits, t, top_p, min_p, rng, out_id, tok, debug=(dp, du), block=block)
    return int(out_id), int(tok), dp, du, rng


def peaked(n: int, seed: int, scale: float = 4.0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("n,t,top_p,min_p,block,scale", [
    (3000, 0.7, 1.0, 0.0, None, 4.0),    # temperature only: the race over all tokens
    (3000, 0.6, 0.95, 0.0, None, 4.0),   # the chat's default
    (2500, 1.0, 0.9, 0.05, 512, 4.0),    # top-p and min-p, several blocks, a partial last one
    (3000, 0.8, 0.95, 0.0, 256, 0.3),    # flat logits: most tokens are candidates
    (1000, 1.3, 0.5, 0.02, 128, 1.0),    # top-p 0.5 with min-p
    (700, 0.9, 1.0, 0.1, None, 4.0),     # min-p alone, one partial block
])
def test_sample_matches_sampling_probs_and_the_race(n, t, top_p, min_p, block, scale):
    logits = peaked(n, seed=n, scale=scale)
    i, tok, dp, du, rng = run(logits, t, top_p, min_p, seed=5, block=block)
    ref_id, probs = ks.sample_ref(logits, t, top_p, min_p, du)
    check_against_reference(logits, t, top_p, min_p, i, tok, dp, du, probs, ref_id)
    assert int(rng[1]) == 1  # the step counter moved
    assert 0.0 < float(du.min()) and float(du.max()) < 1.0
    if top_p < 1.0:
        assert int((dp > 0).sum()) < n  # top-p really dropped tokens


def check_against_reference(logits, t, top_p, min_p, i, tok, dp, du, probs, ref_id):
    """The kernel's top-p set is the sorted form's plus every token tied (same p) with the last one the
    sort keeps (the sort keeps an arbitrary part of a tie; bf16 logits tie often): so its probabilities
    are the softmax renormalised over that set, then min-p, and its id is the race over them."""
    from olmo_local.generate import SamplingParams, sampling_probs

    p = torch.softmax(logits.float() / t, 0)
    topp = sampling_probs(logits.float(), SamplingParams(temperature=t, top_p=top_p)) > 0
    topp = topp | (p == p[topp].min())  # ties at the threshold
    want = torch.where(topp, p, 0.0) / p[topp].sum()
    if min_p > 0:
        want = want.masked_fill(want < min_p * want.max(), 0.0)
    support = dp > 0
    assert torch.equal(support, want > 0)
    assert not ((probs > 0) & ~support).any()  # nothing the reference keeps is dropped
    assert torch.allclose(dp, want, rtol=1e-4, atol=1e-7)
    race = torch.argmax(torch.where(support, dp / -torch.log(du.double()).float(), -1.0))
    assert i == int(race) and tok == i  # the race over the kernel's probabilities; the token buffer too
    if torch.equal(support, probs > 0) and torch.allclose(dp, probs, rtol=1e-4, atol=1e-7):
        assert i == ref_id  # no tie at the threshold: the reference's own draw


def test_sample_block_sizes_agree():
    logits = peaked(4000, seed=11)
    a = run(logits, 0.7, 0.9, 0.0, seed=3)
    b = run(logits, 0.7, 0.9, 0.0, seed=3, block=128)
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
@pytest.mark.parametrize("top_p,min_p,scale", [(0.95, 0.0, 3.0), (1.0, 0.0, 3.0), (0.9, 0.05, 3.0), (0.95, 0.0, 0.3)])
def test_sample_on_cuda_at_the_7b_vocabulary(top_p, min_p, scale):
    logits = peaked(100352, seed=4, scale=scale).cuda()
    i, tok, dp, du, rng = run(logits, 0.6, top_p, min_p, seed=8)
    ref_id, probs = ks.sample_ref(logits.cpu(), 0.6, top_p, min_p, du.cpu())
    check_against_reference(logits.cpu(), 0.6, top_p, min_p, i, tok, dp.cpu(), du.cpu(), probs, ref_id)
    assert int(rng[1]) == 1


def test_uniforms_never_reach_0_or_1():
    # the largest and smallest 23-bit values + 0.5, over 2^23, stay inside (0, 1) in fp32 (24 bits did not:
    # (2^24 - 1 + 0.5) rounds to 2^24, U = 1, E = -log U = 0, and that token would win every race)
    top = (torch.tensor(float(2 ** 23 - 1), dtype=torch.float32) + 0.5) * (1.0 / 2 ** 23)
    low = (torch.tensor(0.0, dtype=torch.float32) + 0.5) * (1.0 / 2 ** 23)
    assert 0.0 < float(low) and float(top) < 1.0 and float(-torch.log(top)) > 0.0
    assert float((torch.tensor(float(2 ** 24 - 1), dtype=torch.float32) + 0.5) / 2 ** 24) == 1.0  # the old bug
    logits = peaked(2000, seed=1)
    _, _, _, du, _ = run(logits, 1.0, 1.0, 0.0, seed=77)
    assert float(du.max()) < 1.0 and float(du.min()) > 0.0


@pytest.mark.parametrize("n,block", [(1000, 128), (4096, 4096), (777, 256), (5, 128)])
def test_greedy_argmax_is_torch_argmax(n, block):
    """greedy_triton writes the first index of the max (as torch.argmax) to both outputs, also when the
    max is tied within a block and across blocks, its counter is reset for the next call, and a given
    decode position is advanced by one."""
    from olmo_local.kernels import _triton
    from olmo_local.kernels.sample import greedy_triton

    gen = torch.Generator().manual_seed(n)
    for case in range(4):
        x = torch.randn(n, generator=gen).to(torch.bfloat16)
        if case == 1:  # ties across blocks: the max at a late and an early position
            x[n - 1] = x[n // 3] = x.max() + 1
        elif case == 2:  # ties inside one block
            x[n // 2] = x[n // 2 + 1] = x.max() + 2
        elif case == 3:
            x = torch.full((n,), -3.0, dtype=torch.bfloat16)  # all equal: id 0
        out_id, out_tok = torch.full((1,), -1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
        pos = torch.tensor([41 + case], dtype=torch.int32)
        greedy_triton(x, out_id, out_tok, block=block, pos=pos if case % 2 else None)
        want = int(torch.argmax(x))
        assert int(out_id) == int(out_tok) == want, case
        assert int(pos) == 41 + case + case % 2  # advanced once when given
    assert all(bool((b == 0).all()) for k, b in _triton._WORKSPACES.items() if k[0] == "greedy_cnt")


def test_sample_advances_a_given_position():
    """sample_triton with ``pos`` adds one to it (the decode step's position, in the pick's last launch)
    and draws the same id as without it."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(2))
    ids = []
    for pos in (None, torch.tensor([7], dtype=torch.int32)):
        rng = torch.tensor([5, 0], dtype=torch.int64)
        out_id, out_tok = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        ks.sample_triton(x, 0.8, 0.9, 0.0, rng, out_id, out_tok, block=128, pos=pos)
        ids.append(int(out_id))
        if pos is not None:
            assert int(pos) == 8
    assert ids[0] == ids[1]
