"""The chunked (prefill) and recurrent (decode) delta rule compute the same function (fp64), and the
recurrent op matches an independent per-head loop written from spec §5.5."""

import pytest
import torch

from olmo_local.kernels.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from olmo_local.kernels.short_conv import causal_conv1d_silu


def _inputs(T, H=3, dk=8, dv=12, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True)
    q = q / q.norm(dim=-1, keepdim=True) * dk ** -0.5
    v = torch.randn(B, T, H, dv, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, H, generator=g, dtype=torch.float64) * 2
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 2  # (0, 2): negative eigenvalues
    S0 = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, gate, beta, S0


@pytest.mark.parametrize("T,chunk", [(1, 64), (63, 64), (64, 64), (65, 64), (150, 64), (37, 16), (100, 32)])
def test_chunked_equals_recurrent_fp64(T, chunk):
    q, k, v, g, beta, S0 = _inputs(T, seed=T)
    o_c, S_c = chunk_gated_delta_rule(q, k, v, g, beta, S0.clone(), chunk_size=chunk)
    S_r = S0.clone()
    o_r = recurrent_gated_delta_rule(q, k, v, g, beta, S_r)
    assert (o_c - o_r).abs().max().item() <= 1e-10
    assert (S_c - S_r).abs().max().item() <= 1e-10


def test_recurrent_matches_spec_loop():
    q, k, v, g, beta, S0 = _inputs(9, B=1, H=2)
    S = S0.clone()
    o = recurrent_gated_delta_rule(q, k, v, g, beta, S)
    for h in range(2):
        Sh = S0[0, h].clone()
        for t in range(9):
            Sh = torch.exp(g[0, t, h]) * Sh                      # 1. decay
            m = Sh.T @ k[0, t, h]                                # 2. read at k
            delta = beta[0, t, h] * (v[0, t, h] - m)             # 3. delta
            Sh = Sh + torch.outer(k[0, t, h], delta)             # 4. write
            assert torch.allclose(o[0, t, h], Sh.T @ q[0, t, h], atol=1e-12)   # 5. read with updated S
        assert torch.allclose(S[0, h], Sh, atol=1e-12)


def test_chunked_state_continuation_matches_one_pass():
    q, k, v, g, beta, _ = _inputs(130)
    o_all, S_all = chunk_gated_delta_rule(q, k, v, g, beta)
    o1, S1 = chunk_gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70])
    o2, S2 = chunk_gated_delta_rule(q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:], S1)
    assert (torch.cat([o1, o2], 1) - o_all).abs().max() <= 1e-10
    assert (S2 - S_all).abs().max() <= 1e-10


def test_chunked_is_differentiable():
    q, k, v, g, beta, _ = (x.float().requires_grad_() for x in _inputs(70))
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    o.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g, beta))


def test_short_conv_state_continuation_and_taps():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 10, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y, st = causal_conv1d_silu(x, w)
    # against torch's conv1d (cross-correlation, left zero padding 3)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=3, groups=5)[..., :10]
    assert torch.allclose(y, torch.nn.functional.silu(ref.transpose(1, 2)), atol=1e-12)
    y1, s1 = causal_conv1d_silu(x[:, :6], w)
    y2, s2 = causal_conv1d_silu(x[:, 6:], w, s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-12) and torch.equal(s2, st)
    assert torch.equal(st[0], x[0, -3:].T)  # the last 3 raw inputs, oldest first


def test_chunked_differentiable_after_inference_mode_call():
    """Cached helper tensors made during an inference_mode call must not break a later autograd call."""
    from olmo_local.kernels import delta_rule

    delta_rule._MASKS.clear()
    x = [t.float() for t in _inputs(20)]
    with torch.inference_mode():
        chunk_gated_delta_rule(*x[:5], chunk_size=8)
    q, k, v, g, beta = (t.requires_grad_() for t in x[:5])
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8)
    o.sum().backward()
    assert q.grad is not None and g.grad is not None
