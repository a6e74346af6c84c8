"""q4 / q8 / nf4 formats, the q4/q8 scale search, linear modules, checkpoint names and loading."""

import json

import pytest
import torch

from olmo_local.errors import OlmoError
from olmo_local.quant import checkpoint as ck
from olmo_local.quant import formats as F
from olmo_local.quant import linear as L

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402


def _gauss(n=256, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def _heavy(n=256, k=512, seed=1):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(2.0).sample((n, k)) * 0.02


def _mse(a, b):
    return (a.float() - b.float()).pow(2).mean().item()


def _dict_io(tensors):
    return tensors.__getitem__, tensors.__contains__


# ------------------------------------------------------------------------------------------ bits


def test_bits_per_weight():
    assert F.bits_per_weight("q4", 128) == 4.25
    assert F.bits_per_weight("q4", 64) == 4.5
    assert F.bits_per_weight("q4", 32) == 5.0
    assert F.bits_per_weight("q8", 0, in_features=3840) == 8 + 16 / 3840  # one scale per row
    assert F.bits_per_weight("q8", 128) == 8.125
    assert F.bits_per_weight("q8", 64) == 8.25
    assert F.bits_per_weight("q8", 32) == 8.5
    assert F.bits_per_weight("nf4") == 4.5
    assert F.bits_per_weight("nf4-dq") == 4 + 8 / 64 + 32 / (64 * 256)
    assert F.bits_per_weight("bf16") == 16
    with pytest.raises(OlmoError):
        F.bits_per_weight("q4", 96)
    with pytest.raises(OlmoError):
        F.bits_per_weight("q3")
    with pytest.raises(OlmoError):
        F.bits_per_weight("q8", 48)


def test_bits_per_weight_matches_stored_bytes():
    w = _gauss(64, 256)
    for g in F.Q4_GROUP_SIZES:
        m = L.Q4Linear(**F.quantize_q4(w, g))
        assert m.nbytes * 8 / w.numel() == F.bits_per_weight("q4", g)
    m = L.Q8Linear(**F.quantize_q8(w))
    assert m.nbytes * 8 / w.numel() == F.bits_per_weight("q8", 0, in_features=256)
    for g in F.Q8_GROUP_SIZES:
        m = L.Q8Linear(**F.quantize_q8(w, group_size=g))
        assert m.group_size == g and m.nbytes * 8 / w.numel() == F.bits_per_weight("q8", g)
    d = F.quantize_nf4(w)
    assert (d["qweight"].numel() + d["quant_state"].absmax.numel() * 4) * 8 / w.numel() == 4.5


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("g", [32, 64, 128])
def test_pack_layout_all_nibbles(g):
    n, k = 16, 2 * g
    q = (torch.arange(n * k).reshape(n, k) * 7 + torch.arange(n)[:, None]) % 16  # every value 0..15
    assert set(q.unique().tolist()) == set(range(16))
    p = F.pack_q4(q, g)
    assert p.dtype == torch.uint8 and p.shape == (n, k // 2)
    for r in range(n):
        for grp in range(k // g):
            for i in range(g // 2):
                byte = int(p[r, grp * g // 2 + i])
                assert byte & 0xF == int(q[r, grp * g + i])
                assert byte >> 4 == int(q[r, grp * g + g // 2 + i])
    assert torch.equal(F.unpack_q4(p, g), q.to(torch.uint8))


def test_pack_all_byte_values_roundtrip():
    p = torch.arange(256, dtype=torch.uint8).reshape(4, 64)  # K = 128, one group per row
    assert torch.equal(F.pack_q4(F.unpack_q4(p, 128), 128), p)


# ------------------------------------------------------------------------------------------ q4 / q8


@pytest.mark.parametrize("g", [32, 64, 128])
def test_q4_roundtrip_bounds(g):
    w = _gauss()
    d = F.quantize_q4(w, g)
    assert d["qweight"].dtype == torch.uint8 and d["qweight"].shape == (256, 256)
    assert d["scales"].dtype == torch.float16 and d["scales"].shape == (256, 512 // g)
    assert d["mins"].dtype == torch.float16 and d["mins"].shape == (256, 512 // g)
    wq = F.dequantize_q4(**d)
    rel = _mse(wq, w) / w.pow(2).mean().item()
    assert rel < {32: 0.008, 64: 0.010, 128: 0.012}[g]
    # plain RTN: every weight lies within half a step (+ fp16 rounding of scale/min) of its value
    r = F.quantize_q4(w, g, search=False)
    wr = F.dequantize_q4(**r).reshape(256, -1, g)
    step = r["scales"].float()[..., None]
    assert ((wr - w.reshape(256, -1, g)).abs() <= 0.5 * step + 16 * step * 2**-10 + 1e-6).all()


def test_q4_heavy_tailed():
    w = _heavy()
    wq = F.dequantize_q4(**F.quantize_q4(w, 128))
    rel = _mse(wq, w) / w.pow(2).mean().item()
    assert rel < 0.05  # t(2) has infinite variance: judged against the sample mean square
    assert torch.isfinite(wq).all()


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("make", [_gauss, _heavy])
def test_q4_search_beats_rtn(g, make):
    w = make()
    search = _mse(F.dequantize_q4(**F.quantize_q4(w, g)), w)
    rtn = _mse(F.dequantize_q4(**F.quantize_q4(w, g, search=False)), w)
    assert search < rtn
    assert search < 0.95 * rtn  # not a marginal gain


@pytest.mark.parametrize("make", [_gauss, _heavy])
def test_q8_roundtrip_and_search(make):
    w = make()
    d = F.quantize_q8(w)
    assert d["qweight"].dtype == torch.int8 and d["qweight"].shape == w.shape
    assert d["scales"].dtype == torch.float16 and d["scales"].shape == (w.shape[0],)
    wq = F.dequantize_q8(**d)
    assert _mse(wq, w) / w.pow(2).mean().item() < 2e-3
    r = F.quantize_q8(w, search=False)
    wr = F.dequantize_q8(**r)
    assert ((wr - w).abs() <= 0.5 * r["scales"].float()[:, None] * (1 + 2**-9) + 1e-7).all()
    assert _mse(wq, w) < _mse(wr, w)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("make", [_gauss, _heavy])
def test_q8_group_roundtrip_bounds(g, make):
    w = make()
    d = F.quantize_q8(w, group_size=g)
    assert d["qweight"].dtype == torch.int8 and d["qweight"].shape == w.shape
    assert d["scales"].dtype == torch.float16 and d["scales"].shape == (256, 512 // g)
    assert int(d["qweight"].abs().max()) <= 127
    wq = F.dequantize_q8(**d)
    # plain RTN: every weight lies within half a step (+ fp16 rounding of the scale) of its value
    r = F.quantize_q8(w, search=False, group_size=g)
    wr = F.dequantize_q8(**r).reshape(256, -1, g)
    step = r["scales"].float()[..., None]
    assert ((wr - w.reshape(256, -1, g)).abs() <= 0.5 * step * (1 + 2**-9) + 1e-7).all()
    # the search never loses to RTN, and groups beat one scale per row (same search)
    assert _mse(wq, w) <= _mse(wr.reshape(w.shape), w)
    row = _mse(F.dequantize_q8(**F.quantize_q8(w)), w)
    assert _mse(wq, w) < {32: 0.55, 64: 0.65, 128: 0.8}[g] * row


def test_q8_group_values_on_the_grid_are_exact():
    """Weights that are exactly q * s (s an fp16 scale per group, max |q| = 127 in every group) come back
    bit for bit: the int8 codes and the scale are recovered, with and without the search."""
    gen = torch.Generator().manual_seed(3)
    n, k, g = 16, 256, 64
    q = torch.randint(-127, 128, (n, k), generator=gen)
    q[:, ::g] = 127  # every group reaches the end of the range
    s = (torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3).half()
    w = (q.float().reshape(n, -1, g) * s.float()[..., None]).reshape(n, k)
    for search in (False, True):
        d = F.quantize_q8(w, search=search, group_size=g)
        assert torch.equal(d["scales"], s) and torch.equal(d["qweight"], q.to(torch.int8))
        assert torch.equal(F.dequantize_q8(**d), w)


def test_q8_group_for():
    assert F.q8_group_for(3840, 128) == 128
    assert F.q8_group_for(192, 128) == 64
    assert F.q8_group_for(288, 128) == 32
    assert F.q8_group_for(512, 64) == 64
    assert F.q8_group_for(100, 128) == 0  # no group size divides: one scale per row
    assert F.q8_group_for(3840, 0) == F.q8_group_for(3840, None) == 0
    with pytest.raises(OlmoError):
        F.quantize_q8(torch.randn(4, 96), group_size=64)  # K not a multiple of G
    with pytest.raises(OlmoError):
        F.quantize_q8(torch.randn(4, 96), group_size=48)


def test_constant_and_zero_groups_exact():
    w = torch.zeros(4, 256)
    w[1] = 0.5
    w[2, :128] = -1.25
    w[3] = torch.linspace(-1, 1, 256)
    wq = F.dequantize_q4(**F.quantize_q4(w, 128))
    assert torch.equal(wq[:3], w[:3])
    assert torch.equal(F.dequantize_q8(**F.quantize_q8(w))[0], w[0])
    wq8 = F.dequantize_q8(**F.quantize_q8(w, group_size=128))
    assert torch.equal(wq8[0], w[0]) and torch.equal(wq8[2, 128:], w[2, 128:])  # all-zero groups


def test_quantize_rejects_bad_input():
    with pytest.raises(OlmoError):
        F.quantize_q4(torch.randn(4, 100), 128)  # K not a multiple of G
    with pytest.raises(OlmoError):
        F.quantize_q4(torch.randn(4, 128), 96)
    bad = torch.randn(4, 128)
    bad[1, 3] = float("nan")
    with pytest.raises(OlmoError):
        F.quantize_q4(bad, 128)
    with pytest.raises(OlmoError):
        F.quantize_q8(bad)


# ------------------------------------------------------------------------------------------ nf4


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_matches_bitsandbytes_linear4bit(dq):
    w = _gauss(128, 256).to(torch.bfloat16)
    d = F.quantize_nf4(w, double_quant=dq)
    ours = F.dequantize_nf4(d["qweight"], d["quant_state"])
    assert ours.dtype == torch.bfloat16 and ours.shape == w.shape
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=dq)
    lin = bnb.nn.Linear4bit(256, 128, bias=False, compress_statistics=dq, quant_type="nf4")
    lin.weight = p
    lin = lin.to("cpu")
    ref = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(ours, ref)
    assert torch.equal(d["qweight"].reshape(-1), lin.weight.data.reshape(-1))
    # our checkpoint tensors == what Linear4bit's state dict holds (names, dtypes, shapes, values)
    ours_sd = ck.quantize_linear_tensors("m.proj", w, "nf4", double_quant=dq)
    bnb_sd = {f"m.proj.{k}": v for k, v in lin.state_dict().items()}
    assert set(ours_sd) == set(bnb_sd) == set(ck.expected_names("m.proj", "nf4", double_quant=dq))
    for k, v in bnb_sd.items():
        assert ours_sd[k].dtype == v.dtype and ours_sd[k].shape == v.shape, k
        if k.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours_sd[k].tolist())) == json.loads(bytes(v.tolist()))
        else:
            assert torch.equal(ours_sd[k], v), k


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_linear4bit_state_dict_loads(dq):
    w = _gauss(64, 128, seed=3).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compress_statistics=dq, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=dq)
    lin = lin.to("cpu")
    sd = {f"model.layers.0.mlp.up_proj.{k}": v.clone() for k, v in lin.state_dict().items()}
    mod = ck.load_linear(*_dict_io(sd), "model.layers.0.mlp.up_proj", "cpu", torch.float32)
    assert isinstance(mod, L.NF4Linear)
    assert (mod.in_features, mod.out_features) == (128, 64)
    ref = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    assert torch.equal(mod.dequantize(), ref)
    x = torch.randn(3, 128)
    torch.testing.assert_close(mod(x), x @ ref.T, rtol=1e-5, atol=1e-5)
    assert mod.nbytes < w.numel() * 2 // 3


def test_bnb_int8_state_dict_loads():
    w = _gauss(64, 128, seed=4).half()
    lin = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    sd = {f"lm.{k}": v.clone() for k, v in lin.state_dict().items()}
    assert "lm.SCB" in sd and sd["lm.weight"].dtype == torch.int8
    mod = ck.load_linear(*_dict_io(sd), "lm", "cpu", torch.float32)
    assert isinstance(mod, L.Q8Linear)
    ref = sd["lm.weight"].float() * sd["lm.SCB"].float()[:, None] / 127
    torch.testing.assert_close(mod.dequantize(), ref, rtol=1e-6, atol=1e-7)
    assert (mod.dequantize() - w.float()).abs().max() < 0.01 * w.float().abs().max()
    sd["lm.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    with pytest.raises(OlmoError):
        ck.load_linear(*_dict_io(sd), "lm", "cpu", torch.float32)


# ------------------------------------------------------------------------------------------ modules


def _modules(w):
    d4 = F.quantize_q4(w, 64)
    d8 = F.quantize_q8(w)
    dn = F.quantize_nf4(w)
    return {
        "dense": L.DenseLinear(w.clone()),
        "q4": L.Q4Linear(**d4),
        "q8": L.Q8Linear(**d8),
        "q8g": L.Q8Linear(**F.quantize_q8(w, group_size=32)),
        "nf4": L.NF4Linear(dn["qweight"], dn["quant_state"]),
    }


@pytest.mark.parametrize("fmt", ["dense", "q4", "q8", "q8g", "nf4"])
def test_forward_matches_dequantize(fmt, monkeypatch):
    w = _gauss(96, 256, seed=5)
    mod = _modules(w)[fmt]
    assert (mod.in_features, mod.out_features) == (256, 96)
    deq = mod.dequantize()
    assert deq.shape == (96, 256) and deq.dtype == torch.float32
    x = torch.randn(2, 3, 256)
    ref = x @ deq.T
    y = mod(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 96)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(L, "_FWD_CHUNK_ELEMS", 256 * 10)  # force the row-chunked path
    monkeypatch.setattr(L, "_FWD_CHUNK_ELEMS_DECODE", 256 * 10)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    for dt in (torch.bfloat16, torch.float16):
        for xx in (x[0, :1], x.reshape(6, 256)):  # decode (int8pack path for q8) and prefill shapes
            yb = mod(xx.to(dt))
            assert yb.dtype == dt
            torch.testing.assert_close(yb.float(), xx @ deq.T, rtol=3e-2, atol=3e-2)


def test_q4_linear_ref_matches_module():
    w = _gauss(64, 256, seed=6)
    d = F.quantize_q4(w, 128)
    x = torch.randn(5, 256)
    y = L.q4_linear_ref(x, d["qweight"], d["scales"], d["mins"], 128)
    torch.testing.assert_close(y, L.Q4Linear(**d)(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, x @ F.dequantize_q4(**d).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,dq", [("dense", False), ("q4", False), ("q8", False), ("q8g", False),
                                    ("nf4", False), ("nf4", True)])
def test_cat_rows(fmt, dq):
    ws = [_gauss(n, 128, seed=10 + i) for i, n in enumerate((32, 64, 96))]
    if fmt == "nf4":
        mods = [L.NF4Linear(**dict(zip(("weight", "quant_state"), F.quantize_nf4(w, dq).values()))) for w in ws]
    else:
        mods = [_modules(w)[fmt] for w in ws]
    fused = type(mods[0]).cat_rows(mods)
    assert (fused.in_features, fused.out_features) == (128, 192)
    ref = torch.cat([m.dequantize() for m in mods], 0)
    if fmt == "nf4" and dq:  # fp32 absmax vs the double-quantized one: same up to float rounding
        torch.testing.assert_close(fused.dequantize(), ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(fused.dequantize(), ref)
    x = torch.randn(4, 128)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], -1), rtol=1e-5, atol=1e-5)


def test_q8_cat_rows_mixed_layouts_are_lossless():
    """Per-row and group scales (and different group sizes) stack into one group layout, values unchanged."""
    ws = [_gauss(n, 128, seed=20 + i) for i, n in enumerate((16, 24, 8))]
    mods = [L.Q8Linear(**F.quantize_q8(ws[0])), L.Q8Linear(**F.quantize_q8(ws[1], group_size=64)),
            L.Q8Linear(**F.quantize_q8(ws[2], group_size=32))]
    fused = L.Q8Linear.cat_rows(mods)
    assert fused.group_size == 32 and fused.scales.shape == (48, 4)
    assert torch.equal(fused.dequantize(), torch.cat([m.dequantize() for m in mods], 0))


def test_cat_rows_rejects_mixed():
    w = _gauss(32, 128)
    m = _modules(w)
    with pytest.raises(OlmoError):
        L.Q4Linear.cat_rows([m["q4"], L.Q4Linear(**F.quantize_q4(w, 128))])
    with pytest.raises(OlmoError):
        L.Q8Linear.cat_rows([m["q8"], m["q4"]])
    with pytest.raises(OlmoError):
        L.Q8Linear.cat_rows([m["q8"], L.Q8Linear(**F.quantize_q8(_gauss(32, 256)))])
    d = F.quantize_nf4(_gauss(2, 96))  # blocks straddle rows
    with pytest.raises(OlmoError):
        L.NF4Linear.cat_rows([L.NF4Linear(d["qweight"], d["quant_state"])] * 2)


def test_qembedding():
    w = _gauss(100, 64, seed=7)
    emb = L.QEmbedding.from_weight(w, torch.bfloat16)
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 64)
    torch.testing.assert_close(out, emb.dequantize(torch.bfloat16)[ids])
    assert emb.nbytes == 100 * 64 + 100 * 2
    embg = L.QEmbedding.from_weight(w, torch.float32, group_size=32)
    assert embg.scales.shape == (100, 2) and embg.nbytes == 100 * 64 + 100 * 2 * 2
    assert torch.equal(embg(ids), embg.dequantize()[ids])
    assert _mse(embg.dequantize(), w) < _mse(emb.dequantize(), w)
    assert torch.equal(embg.as_linear().dequantize(), embg.dequantize())  # the tied head: same table
    sd = ck.quantize_linear_tensors("model.embed_tokens", w, "q8")
    e2 = ck.load_embedding(*_dict_io(sd), "model.embed_tokens", "cpu", torch.float32)
    assert isinstance(e2, L.QEmbedding)
    torch.testing.assert_close(e2(ids), emb(ids).float(), rtol=1e-2, atol=1e-3)
    e3 = ck.load_embedding(*_dict_io({"e.weight": w}), "e", "cpu", torch.float32)
    assert torch.equal(e3(ids), w[ids])


# ------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("fmt,cls", [("q4", L.Q4Linear), ("q8", L.Q8Linear), ("nf4", L.NF4Linear),
                                     ("nf4-dq", L.NF4Linear), ("bf16", L.DenseLinear)])
def test_quantize_then_load(fmt, cls):
    w = _gauss(64, 256, seed=8).to(torch.bfloat16)
    sd = ck.quantize_linear_tensors("model.layers.1.self_attn.q_proj", w, fmt, group_size=64)
    assert set(sd) == set(ck.expected_names("model.layers.1.self_attn.q_proj", fmt))
    mod = ck.load_linear(*_dict_io(sd), "model.layers.1.self_attn.q_proj", "cpu", torch.bfloat16)
    assert type(mod) is cls
    if fmt == "q4":
        assert mod.group_size == 64
    assert _mse(mod.dequantize(), w) < 0.02 * w.float().pow(2).mean().item()


def _q4_sd():
    return ck.quantize_linear_tensors("p", _gauss(32, 256), "q4", 128)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda sd: sd.update({"p.qweight": sd["p.qweight"][:, :-1]}),  # wrong K for the scales
        lambda sd: sd.update({"p.qweight": sd["p.qweight"][:-1]}),  # wrong N
        lambda sd: sd.pop("p.scales"),  # missing scales
        lambda sd: sd.update({"p.scales": sd["p.scales"].float()}),  # wrong dtype
        lambda sd: sd.update({"p.mins": sd["p.mins"][:, :1]}),  # mins shape != scales shape
        lambda sd: sd.update({"p.qweight": sd["p.qweight"].to(torch.int8)}),
        lambda sd: sd.update({"p.scales": sd["p.scales"][:, :1], "p.mins": sd["p.mins"][:, :1]}),  # G=256
    ],
)
def test_corrupt_q4_raises(mutate):
    sd = _q4_sd()
    mutate(sd)
    with pytest.raises(OlmoError, match="p"):
        ck.load_linear(*_dict_io(sd), "p", "cpu", torch.float32)


def test_q8_checkpoint_layouts():
    """quantize_linear_tensors writes group scales (largest of 128/64/32 dividing K, at most the group
    size asked for); per-row q8 (olmo-local's older layout, and --group-size 0) still loads."""
    w = _gauss(32, 192, seed=9)
    sd = ck.quantize_linear_tensors("p", w, "q8")  # default group size 128: 192 takes 64
    assert sd["p.scales"].shape == (32, 3) and sd["p.scales"].dtype == torch.float16
    mod = ck.load_linear(*_dict_io(sd), "p", "cpu", torch.float32)
    assert mod.group_size == 64
    assert torch.equal(mod.dequantize(), F.dequantize_q8(sd["p.qweight"], sd["p.scales"]))
    row = ck.quantize_linear_tensors("p", w, "q8", group_size=0)
    assert row["p.scales"].shape == (32,)
    old = ck.load_linear(*_dict_io(row), "p", "cpu", torch.float32)
    assert type(old) is L.Q8Linear and old.group_size == 0
    assert torch.equal(old.dequantize(), F.dequantize_q8(**F.quantize_q8(w)))
    assert ck.quantize_linear_tensors("p", _gauss(8, 100), "q8")["p.scales"].shape == (8,)  # no group fits
    for bad in ({"p.scales": sd["p.scales"].float()},  # group scales must be fp16
                {"p.scales": sd["p.scales"][:, :2]},  # 2 groups of 96: not a q8 group size
                {"p.scales": sd["p.scales"][:-1]}):
        with pytest.raises(OlmoError, match="q8"):
            ck.load_linear(*_dict_io({**sd, **bad}), "p", "cpu", torch.float32)


def test_corrupt_other_formats_raise():
    q8 = ck.quantize_linear_tensors("p", _gauss(32, 128), "q8")
    for bad in ({"p.scales": q8["p.scales"][:-1]}, {"p.qweight": q8["p.qweight"].to(torch.uint8)}):
        with pytest.raises(OlmoError):
            ck.load_linear(*_dict_io({**q8, **bad}), "p", "cpu", torch.float32)
    with pytest.raises(OlmoError):
        ck.load_linear(*_dict_io({"p.qweight": q8["p.qweight"]}), "p", "cpu", torch.float32)

    nf = ck.quantize_linear_tensors("p", _gauss(32, 128), "nf4")
    qs_key = "p.weight.quant_state.bitsandbytes__nf4"
    bads = [
        {"p.weight.absmax": nf["p.weight.absmax"][:-1]},
        {"p.weight": nf["p.weight"][:-5]},
        {qs_key: torch.tensor(list(b"{not json"), dtype=torch.uint8)},
    ]
    for bad in bads:
        with pytest.raises(OlmoError):
            ck.load_linear(*_dict_io({**nf, **bad}), "p", "cpu", torch.float32)
    with pytest.raises(OlmoError):
        ck.load_linear(*_dict_io({k: v for k, v in nf.items() if k != qs_key}), "p", "cpu", torch.float32)

    with pytest.raises(OlmoError, match="missing"):
        ck.load_linear(*_dict_io({}), "p", "cpu", torch.float32)
    with pytest.raises(OlmoError):
        ck.load_linear(*_dict_io({"p.weight": torch.zeros(4, 4, dtype=torch.int32)}), "p", "cpu", torch.float32)
    with pytest.raises(OlmoError):
        ck.expected_names("p", "q3")


def test_q4linear_tiled_layout_is_the_same_layer():
    """tile_() rearranges a q4 linear into the decode GEMV's layout: forward, dequantize, standard()
    row slices and cat_rows give what the standard layout gives; rows that are not whole 128-row
    blocks stay standard."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(256, 192, generator=gen)
    a, b = L.Q4Linear(**F.quantize_q4(w, 64)), L.Q4Linear(**F.quantize_q4(w, 64))
    assert b.tile_() and b.tiled and not a.tiled and "tiled" in repr(b)
    assert not torch.equal(a.qweight, b.qweight)  # really rearranged
    x = torch.randn(3, 192, generator=gen)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert torch.equal(b.dequantize(), a.dequantize())
    for r0, r1 in [(0, 256), (5, 70), (64, 128), (130, 131)]:
        assert all(torch.equal(u, v) for u, v in zip(b.standard(r0, r1), a.standard(r0, r1)))
    c = L.Q4Linear.cat_rows([b, a])
    assert not c.tiled and torch.equal(c.dequantize(), torch.cat([a.dequantize(), a.dequantize()]))
    odd = L.Q4Linear(**F.quantize_q4(w[:192], 64))
    assert not odd.tile_() and not odd.tiled
    assert L.tile_q4_layers(torch.nn.Sequential(a, b)) == 0  # CPU tensors: only CUDA layers are tiled


def test_q8_one_group_per_row_takes_the_int8_cpu_op(monkeypatch):
    """q8 whose group covers the whole row (K <= G: the tiny model's lm_head) is per-row q8: bf16 decode
    on CPU goes through torch's int8 weight-only op, not the row-chunked dequantization, and agrees."""
    w = _gauss(96, 128, seed=8)
    mod = L.Q8Linear(**F.quantize_q8(w, group_size=128))
    assert mod.scales.shape == (96, 1)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 128)
    y = mod(x.to(torch.bfloat16))
    assert calls == [1]
    torch.testing.assert_close(y.float(), x @ mod.dequantize().T, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q4_bf16_cpu_decode_takes_the_int4_cpu_op(group, monkeypatch):
    """q4 with bf16 activations on CPU (up to 64 rows) runs torch's int4 weight-only op on a repacked
    copy (zero = min + 8 scale) and agrees with the dequantized weights; fp32 activations keep the exact
    dequantize path (quality measurements), and more rows the chunked GEMM."""
    if not L._HAS_INT4PACK:
        pytest.skip("this torch has no int4 CPU op")
    w = _gauss(96, 256, seed=9)
    mod = L.Q4Linear(**F.quantize_q4(w, group), group_size=group)
    deq = mod.dequantize()
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    for rows in (1, 8, 64):
        x = torch.randn(rows, 256)
        y = mod(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
        torch.testing.assert_close(y.float(), x @ deq.T, rtol=3e-2, atol=3e-2)
    assert len(calls) == 3
    mod(torch.randn(65, 256).to(torch.bfloat16))
    x = torch.randn(2, 256)
    torch.testing.assert_close(mod(x), x @ deq.T, rtol=1e-5, atol=1e-5)  # fp32: exact path
    assert len(calls) == 3


def test_q8_group_scales_bf16_cpu_decode_takes_the_int8_op_per_group(monkeypatch):
    """Group-scaled q8 (G < K) with bf16 activations on CPU: the int8 op once per group on a group-major
    copy, summed in fp32; agrees with the dequantized weights. Past the copy budget the layer keeps the
    chunked dequantization, and moving the module drops its copy (and its share of the budget)."""
    w = _gauss(96, 256, seed=10)
    mod = L.Q8Linear(**F.quantize_q8(w, group_size=64))
    deq = mod.dequantize()
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 256)
    y = mod(x.to(torch.bfloat16))
    assert len(calls) == 4  # 256 / 64 groups
    torch.testing.assert_close(y.float(), x @ deq.T, rtol=3e-2, atol=3e-2)
    used = L._int8_grouped_bytes
    assert used >= 96 * 256
    mod.to(torch.device("cpu"))  # _apply: the copy is dropped
    assert L._int8_grouped_bytes == used - 96 * 256
    mod(x.to(torch.bfloat16))
    del mod  # garbage: its share goes back too
    import gc

    gc.collect()
    assert L._int8_grouped_bytes == used - 96 * 256
    monkeypatch.setattr(L, "_INT8_GROUPED_BUDGET", 0)
    other = L.Q8Linear(**F.quantize_q8(w, group_size=64))
    calls.clear()
    torch.testing.assert_close(other(x.to(torch.bfloat16)).float(), x @ deq.T, rtol=3e-2, atol=3e-2)
    assert calls == []
