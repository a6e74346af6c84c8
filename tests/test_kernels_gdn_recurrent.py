"""The one-launch gated delta rule for prefill (kernels/gdn_recurrent.py) against its torch reference
and against the chunked form the model used before, in the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F
from olmo_local.kernels import gdn_recurrent as gr
from olmo_local.kernels.delta_rule import chunk_gated_delta_rule_heads, gdn_gates


def inputs(B, hk, hv, T, dk, dv, seed, a_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, hk, T, dk, generator=gen), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, hk, T, dk, generator=gen), dim=-1)
    v = torch.randn(B, hv, T, dv, generator=gen)
    a = torch.randn(B, T, hv, generator=gen) * a_scale  # some past softplus' threshold of 20 when scaled
    b = torch.randn(B, T, hv, generator=gen) * 2
    A_log = torch.randn(hv, generator=gen) * 0.5
    dt_bias = torch.randn(hv, generator=gen) * 0.5
    return q, k, v, a, b, A_log, dt_bias


@pytest.mark.parametrize("B,hk,hv,T,dk,dv,block_v,with_state", [
    (1, 2, 2, 9, 16, 32, None, False),
    (2, 1, 3, 5, 12, 20, 8, True),     # odd sizes: masks on dk and dv, Hv = 3 Hk (no repeat copy)
    (1, 2, 4, 33, 32, 64, 32, True),   # two value slices per head
    (1, 1, 1, 1, 8, 8, None, True),    # one token
    (1, 2, 4, 33, 32, 64, 32, "dk-major"),  # the state stored dk-major (DecodeState on CUDA)
    (2, 1, 3, 5, 12, 20, 8, "dk-major"),
])
def test_recurrent_prefill_matches_reference(B, hk, hv, T, dk, dv, block_v, with_state):
    q, k, v, a, b, A_log, dt_bias = inputs(B, hk, hv, T, dk, dv, seed=T)
    s0 = torch.randn(B, hv, dk, dv, generator=torch.Generator().manual_seed(1)) * 0.1 if with_state else None
    s_ref = s0.clone() if with_state else None
    s_tri = s0.clone() if with_state else None
    if with_state == "dk-major":
        s_tri = s0.transpose(2, 3).contiguous().transpose(2, 3)
        assert s_tri.stride()[2:] == (1, dk)
    want = gr.gdn_recurrent_prefill_ref(q, k, v, a, b, A_log, dt_bias, 2.0, s_ref)
    got = gr.gdn_recurrent_prefill_triton(q, k, v, a, b, A_log, dt_bias, 2.0, s_tri, block_v=block_v)
    assert got.shape == (B, hv, T, dv)
    assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())
    if with_state:
        assert (s_tri - s_ref).abs().max().item() < 1e-4 * (1 + s_ref.abs().max().item())
        assert not torch.equal(s_tri, s0)  # updated in place


def test_recurrent_prefill_equals_the_chunked_form():
    """Same math as the chunked delta rule the model ran before (gates computed the model's way)."""
    q, k, v, a, b, A_log, dt_bias = inputs(1, 2, 2, 70, 16, 24, seed=3, a_scale=1.0)
    s0 = torch.randn(1, 2, 16, 24, generator=torch.Generator().manual_seed(2)) * 0.1
    g, beta = gdn_gates(a, b, A_log, dt_bias, 2.0)
    o_c, s_c = chunk_gated_delta_rule_heads(q, k, v, g.transpose(1, 2), beta.transpose(1, 2), s0.clone(), 32)
    s_t = s0.clone()
    o_t = gr.gdn_recurrent_prefill_triton(q, k, v, a, b, A_log, dt_bias, 2.0, s_t)
    assert (o_t - o_c).abs().max().item() < 1e-4
    assert (s_t - s_c).abs().max().item() < 1e-4


def test_recurrent_prefill_rejects_bad_inputs():
    q, k, v, a, b, A_log, dt_bias = inputs(1, 2, 2, 4, 8, 8, seed=0)
    with pytest.raises(ValueError, match="fp32"):
        gr.gdn_recurrent_prefill_triton(q, k, v, a, b, A_log, dt_bias, 2.0, torch.zeros(1, 2, 8, 8).double())
    with pytest.raises(ValueError, match="shapes"):
        gr.gdn_recurrent_prefill_triton(q, k[:, :1], v, a, b, A_log, dt_bias, 2.0)


@pytest.mark.parametrize("with_state", [False, True, "dk-major"])
def test_model_uses_it_and_matches_the_chunked_torch_path(with_state, monkeypatch):
    """GDN layers under the Triton backend run the one-launch kernel (interpreter here): logits and the
    decode state equal those of the chunked torch path, with and without a state, and with the state
    stored dk-major (as DecodeState does on CUDA)."""
    from olmo_local.config import preset
    from olmo_local.kernels import backend
    from olmo_local.model import GDNLayer, OlmoHybridModel
    from olmo_local.state import DecodeState

    cfg = preset("tiny", num_hidden_layers=2, linear_num_key_heads=1, linear_num_value_heads=2)
    model = OlmoHybridModel(cfg)
    model.init_weights_(seed=4)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    if with_state == "dk-major":
        monkeypatch.setattr(DecodeState, "rec_dk_major", True)
    calls = []
    real = gr.gdn_recurrent_prefill
    monkeypatch.setattr("olmo_local.model.gdn_recurrent_prefill", lambda *a: calls.append(1) or real(*a))
    out = {}
    with torch.no_grad(), backend("triton"):
        for fused in (True, False):
            monkeypatch.setattr(GDNLayer, "fused_prefill", fused)
            st = DecodeState(cfg, 64) if with_state else None
            if with_state == "dk-major":
                assert st.rec_state.stride()[2:] == (1, cfg.linear_key_head_dim)
            logits = model(ids, st)
            out[fused] = (logits, st.rec_state.clone() if st else logits, st.conv_state.clone() if st else logits)
    assert len(calls) == sum(isinstance(m, GDNLayer) for m in model.modules())  # only in the fused run
    for t, r in zip(out[True], out[False]):
        assert (t - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_recurrent_prefill_7b_heads_on_cuda():
    """7B head sizes (dk 96, dv 192, 30 heads), 512 tokens with a state: the kernel vs the chunked form."""
    q, k, v, a, b, A_log, dt_bias = (x.cuda() for x in inputs(1, 30, 30, 512, 96, 192, seed=5, a_scale=1.0))
    s0 = torch.randn(1, 30, 96, 192, generator=torch.Generator().manual_seed(3)).cuda() * 0.05
    g, beta = gdn_gates(a, b, A_log, dt_bias, 2.0)
    o_c, s_c = chunk_gated_delta_rule_heads(q, k, v, g.transpose(1, 2), beta.transpose(1, 2), s0.clone())
    s_t = s0.clone()
    o_t = gr.gdn_recurrent_prefill(q, k, v, a, b, A_log, dt_bias, 2.0, s_t)
    assert (o_t - o_c).abs().max().item() < 1e-3
    assert (s_t - s_c).abs().max().item() < 1e-3


@pytest.mark.parametrize("T,n,with_state", [(9, 4, False), (16, 1, True), (33, 33, True), (12, 7, "dk-major")])
def test_recurrent_prefill_padding_leaves_the_state_of_the_prompt(T, n, with_state):
    """n_valid = n of T tokens (a padded prompt, as the prefill graphs run it): the state is the one after the
    first n tokens and their outputs are those of the unpadded prompt, in the kernel and in the reference."""
    B, hk, hv, dk, dv = 1, 2, 4, 16, 24
    q, k, v, a, b, A_log, dt_bias = inputs(B, hk, hv, T, dk, dv, seed=T + n)
    s0 = torch.randn(B, hv, dk, dv, generator=torch.Generator().manual_seed(7)) * 0.1 if with_state else None
    trunc = [x[:, :, :n] for x in (q, k, v)] + [x[:, :n] for x in (a, b)]
    s_want = s0.clone() if with_state else torch.zeros(B, hv, dk, dv)
    want = gr.gdn_recurrent_prefill_ref(*trunc, A_log, dt_bias, 2.0, s_want)
    nv = torch.tensor([n])
    for fn in (gr.gdn_recurrent_prefill_ref, gr.gdn_recurrent_prefill_triton):
        s = s0.clone() if with_state else torch.zeros(B, hv, dk, dv)
        if with_state == "dk-major":
            s = s.transpose(2, 3).contiguous().transpose(2, 3)
        got = fn(q, k, v, a, b, A_log, dt_bias, 2.0, s, n_valid=nv)
        assert (got[:, :, :n] - want).abs().max().item() < 1e-5, fn.__name__
        assert (s - s_want).abs().max().item() < 1e-5, fn.__name__
        if n < T:  # the pads did run (their outputs read the state) but wrote nothing
            s_all = s0.clone() if with_state else torch.zeros(B, hv, dk, dv)
            gr.gdn_recurrent_prefill_ref(q, k, v, a, b, A_log, dt_bias, 2.0, s_all)
            assert (s_all - s_want).abs().max().item() > 1e-3


@pytest.mark.parametrize("T,n,with_state", [(8, 5, True), (8, 1, True), (8, 2, False), (8, 8, True), (4, 3, False)])
def test_conv_state_at_the_last_real_token(T, n, with_state):
    """conv_state_at(qkv, state, K-1, n) equals the conv state an unpadded prompt of n tokens leaves, including
    prompts shorter than K-1 (rows from the previous state, or zeros)."""
    from olmo_local.kernels.gdn_prefill import _new_conv_state, conv_state_at

    gen = torch.Generator().manual_seed(T * 10 + n)
    qkv = torch.randn(1, T, 6, generator=gen)
    st = torch.randn(1, 6, 3, generator=gen) if with_state else None
    want = _new_conv_state(qkv[:, :n], st, 3)
    got = conv_state_at(qkv, st, 3, torch.tensor([n]))
    assert got.shape == want.shape == (1, 6, 3)
    assert torch.equal(got, want)
