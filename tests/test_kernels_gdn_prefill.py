"""GDN prefill elementwise kernels (conv + SiLU + L2 norm into head-first fp32; gated RMSNorm): the
Triton kernels (interpreter) against their torch references, the references against the previous
formulation written out plainly, and the model forward with either backend."""

import pytest
import torch
import torch.nn.functional as F
from olmo_local.kernels import backend
from olmo_local.kernels import gdn_prefill as kp


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def prep_inputs(B, T, hk, hv, dk, dv, K, dtype, seed, state=True):
    gen = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    wide = torch.randn(B, T, c + 24, generator=gen)  # a strided slice, as the fused projection gives it
    qkv = wide[..., 5:5 + c].to(dtype)
    w = (torch.randn(c, K, generator=gen) * 0.5).to(dtype)
    st = torch.randn(B, c, K - 1, generator=gen).to(dtype) if state else None
    return qkv, w, st


def plain_prep(qkv, w, st, hk, hv, dk, dv, q_scale):
    """conv by explicit taps in float64, SiLU, rounding to qkv.dtype, per-head L2 norm."""
    B, T, c = qkv.shape
    K = w.shape[1]
    prev = torch.zeros(B, K - 1, c, dtype=qkv.dtype) if st is None else st.transpose(1, 2)
    xp = torch.cat([prev, qkv], 1).double()
    y = sum(xp[:, j:j + T] * w[:, j].double() for j in range(K))
    y = F.silu(y).to(qkv.dtype).double()
    q, k, v = y.split([hk * dk, hk * dk, hv * dv], -1)
    q, k = q.reshape(B, T, hk, dk), k.reshape(B, T, hk, dk)
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt() * q_scale
    k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    v = v.reshape(B, T, hv, dv)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), xp[:, T:].transpose(1, 2).to(qkv.dtype)


CASES = [  # B, T, hk, hv, dk, dv, K, state
    (1, 37, 2, 2, 16, 32, 4, True),
    (1, 2, 2, 2, 16, 32, 4, True),   # fewer tokens than the conv state holds
    (2, 9, 1, 2, 12, 24, 4, False),  # hv > hk, non-power-of-2 head dims, a batch, no state
    (1, 70, 3, 3, 8, 16, 3, True),
]


@pytest.mark.parametrize("B,T,hk,hv,dk,dv,K,state", CASES)
def test_prep_ref_matches_plain_fp64(B, T, hk, hv, dk, dv, K, state):
    qkv, w, st = prep_inputs(B, T, hk, hv, dk, dv, K, torch.float64, seed=T, state=state)
    got = kp.gdn_prefill_prep_ref(qkv, w, st, hk, hv, dk, dv, dk ** -0.5)
    want = plain_prep(qkv, w, st, hk, hv, dk, dv, dk ** -0.5)
    for g, e in zip(got, want):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-12)
    assert all(t.is_contiguous() for t in got[:3])


@pytest.mark.parametrize("B,T,hk,hv,dk,dv,K,state", CASES)
@pytest.mark.parametrize("block_t", [None, 4])
def test_prep_triton_matches_ref_fp32(B, T, hk, hv, dk, dv, K, state, block_t):
    qkv, w, st = prep_inputs(B, T, hk, hv, dk, dv, K, torch.float32, seed=T + 1, state=state)
    ref = kp.gdn_prefill_prep_ref(qkv, w, st, hk, hv, dk, dv, 0.3)
    got = kp.gdn_prefill_prep_triton(qkv, w, st, hk, hv, dk, dv, 0.3, block_t=block_t)
    for g, e in zip(got[:3], ref[:3]):
        assert g.shape == e.shape and g.dtype == torch.float32 and g.is_contiguous()
        assert (g - e).abs().max().item() <= 2e-6
    assert torch.equal(got[3], ref[3])


def test_prep_triton_bf16():
    qkv, w, st = prep_inputs(1, 21, 2, 2, 16, 32, 4, torch.bfloat16, seed=5)
    ref = kp.gdn_prefill_prep_ref(qkv, w, st, 2, 2, 16, 32, 0.25)
    got = kp.gdn_prefill_prep_triton(qkv, w, st, 2, 2, 16, 32, 0.25)
    for g, e in zip(got[:3], ref[:3]):
        assert relerr(g, e) < 1e-2  # the interpreter truncates (does not round) to bf16
    assert torch.equal(got[3], ref[3]) and got[3].dtype == torch.bfloat16


def gated_inputs(B, T, H, dv, zdtype, seed):
    gen = torch.Generator().manual_seed(seed)
    o_heads = torch.randn(B, H, T, dv, generator=gen)          # the delta rule's head-first output
    zw = torch.randn(B, T, H * dv + 7, generator=gen).to(zdtype)  # z: a slice of the projection
    z = zw[..., 3:3 + H * dv].reshape(B, T, H, dv)
    w = (1 + 0.2 * torch.randn(dv, generator=gen)).to(zdtype)
    return o_heads.transpose(1, 2), z, w


def test_gated_ref_matches_plain():
    o, z, w = gated_inputs(2, 5, 3, 24, torch.float64, seed=1)
    o = o.double()
    want = o / (o.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w * F.silu(z)
    got = kp.gated_rms_norm_ref(o, z, w, 1e-5)
    assert torch.allclose(got, want, atol=1e-12) and got.is_contiguous()


@pytest.mark.parametrize("B,T,H,dv", [(1, 13, 3, 32), (2, 5, 2, 24)])
@pytest.mark.parametrize("block_t", [None, 2])
def test_gated_triton_matches_ref(B, T, H, dv, block_t):
    o, z, w = gated_inputs(B, T, H, dv, torch.float32, seed=T)
    ref = kp.gated_rms_norm_ref(o, z, w, 1e-5)
    got = kp.gated_rms_norm_triton(o, z, w, 1e-5, block_t=block_t)
    assert got.shape == ref.shape and got.is_contiguous()
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    o, z, w = gated_inputs(B, T, H, dv, torch.bfloat16, seed=T)
    got = kp.gated_rms_norm_triton(o, z, w, 1e-5, block_t=block_t)
    assert got.dtype == torch.bfloat16 and relerr(got, kp.gated_rms_norm_ref(o, z, w, 1e-5)) < 1e-2


def test_dispatch_keeps_autograd_on_the_reference():
    qkv, w, st = prep_inputs(1, 6, 1, 1, 8, 16, 4, torch.float32, seed=3)
    qkv.requires_grad_(True)
    with backend("triton"):
        q, k, v, _ = kp.gdn_prefill_prep(qkv, w, st, 1, 1, 8, 16, 0.5)
    (q.sum() + k.sum() + v.sum()).backward()
    assert qkv.grad is not None


def test_model_forward_same_with_triton_kernels():
    """The whole model (fp32, CPU): GDN prep / gated norm through the interpreter == the references."""
    from olmo_local.config import preset
    from olmo_local.model import OlmoHybridModel
    from olmo_local.state import DecodeState

    cfg = preset("tiny", num_hidden_layers=2, linear_num_key_heads=1, linear_num_value_heads=2)
    model = OlmoHybridModel(cfg)
    model.init_weights_(seed=3)
    ids = torch.randint(0, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for name in ("torch", "triton"):
            with backend(name):
                st = DecodeState(cfg, 128)
                a = model(ids[:, :33], st)
                b = model(ids[:, 33:], st)
                out[name] = (torch.cat([a, b], 1), st.rec_state.clone(), st.conv_state.clone())
    for t, r in zip(out["triton"], out["torch"]):
        assert (t - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item())
