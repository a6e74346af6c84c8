"""Padded prefill (olmo_local.prefill_graph): a prompt padded to a bucket length, fresh or continuing a
sequence, leaves exactly the state and logits of the unpadded prompt (the path the CUDA graphs replay, run
eagerly here), the Generator takes it for prompts that fit a bucket and the context, and on CUDA the graph
replay equals the eager prefill."""

import copy

import pytest
import torch

from hf_ref import hf_model, tiny_config, write_checkpoint
from olmo_local.checkpoint import load_model
from olmo_local.generate import Generator
from olmo_local.prefill_graph import PrefillGraphs
from olmo_local.state import DecodeState


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for rope in (None, 10000.0):
        cfg = tiny_config(rope_theta=rope, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                          linear_key_head_dim=16, linear_value_head_dim=32)
        path = write_checkpoint(hf_model(cfg, seed=3), cfg, tmp_path_factory.mktemp("ckpt"))
        out[rope] = (cfg, load_model(path, "cpu", torch.float32))
    return out


def _q4(model):
    from olmo_local.quant.formats import quantize_q4
    from olmo_local.quant.linear import Q4Linear

    for layer in model.layers:
        for name, mod in list(layer.named_modules()):
            if name.endswith(("qkvz", "qkv", "o", "gate_up", "down")) and hasattr(mod, "weight"):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], Q4Linear(**quantize_q4(mod.weight.float(), 32)))
    return model


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


def _same_state(a: DecodeState, b: DecodeState, n: int, rtol: float = 1e-5) -> None:
    """Same position and tokens; GDN states and the KV rows of the prompt within rtol (relative to the
    largest value)."""
    assert a.pos == b.pos == n and a.tokens == b.tokens and int(b.pos_t) == n
    pairs = [(a.conv_state, b.conv_state), (a.rec_state, b.rec_state), (a.k_cache[:, :, :n], b.k_cache[:, :, :n]),
             (a.v_cache[:, :, :n], b.v_cache[:, :, :n])]
    if a.kv_int8:
        pairs.append((a.k_scale[:, :, :n], b.k_scale[:, :, :n]))
    for x, y in pairs:
        x, y = x.float(), y.float()
        assert (x - y).abs().max().item() <= rtol * (1 + x.abs().max().item())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("start", [0, 6])
@pytest.mark.parametrize("rope,kv,fmt", [(None, "bf16", "fp32"), (10000.0, "bf16", "fp32"), (None, "int8", "fp32"),
                                         (None, "bf16", "q4")])
def test_padded_prompt_equals_the_plain_prefill(models, n, start, rope, kv, fmt):
    """n real tokens padded to the bucket of 16 (buckets 4 and 16), on a fresh state or after a 6-token prompt:
    same logits, GDN states, KV rows, position and token list as the eager prefill of the n tokens, and the
    next decode step agrees too."""
    cfg, model = models[rope]
    if fmt == "q4":
        model = _q4(copy.deepcopy(model))
    ids = _prompt(n, cfg.vocab_size)
    plain = DecodeState(cfg, 64, "cpu", torch.float32, kv_cache=kv)
    padded = DecodeState(cfg, 64, "cpu", torch.float32, kv_cache=kv)
    if start:
        first = _prompt(start, cfg.vocab_size, seed=100)
        Generator(model, plain).prefill(first)
        Generator(model, padded).prefill(first)
    want = Generator(model, plain).prefill(ids)
    pg = PrefillGraphs(model, padded, use_graph=False, buckets=(4, 16))
    # stale pads: another prompt's tokens sit past n in the static buffer
    pg.tokens.copy_(torch.randint(4, cfg.vocab_size, pg.tokens.shape, generator=torch.Generator().manual_seed(9)))
    got = pg(ids)
    assert got.shape == want.shape == (cfg.vocab_size,)
    # the project's bound against the reference (fp32); except for a fresh int8-KV prompt: the eager prefill
    # attends to its own keys and values as computed, the padded one reads them back from the cache as stored
    # (int8 codes and scales, as every decode step and every continuing prompt does)
    tol, rtol = (3e-2, 3e-2) if (kv == "int8" and start == 0) else (1e-4, 1e-5)
    assert (got - want).abs().max().item() <= tol
    _same_state(plain, padded, start + n, rtol=rtol)
    nxt = int(torch.argmax(want))
    s_plain, s_padded = Generator(model, plain).step(nxt), Generator(model, padded).step(nxt)
    assert (s_plain - s_padded).abs().max().item() <= tol


def test_generator_takes_the_padded_path_for_prompts_that_fit(models):
    cfg, model = models[None]
    st = DecodeState(cfg, 40, "cpu", torch.float32)
    gen = Generator(model, st)
    gen.prefill_graphs = pg = PrefillGraphs(model, st, use_graph=False, buckets=(4, 16, 64))
    seen = []
    gen.prefill(_prompt(5, cfg.vocab_size), progress=lambda done, total: seen.append((done, total)))
    assert pg.replays == 1 and st.pos == 5 and seen == [(5, 5)]
    gen.prefill(_prompt(3, cfg.vocab_size))  # continues the sequence: bucket 4 at position 5
    assert pg.replays == 2 and st.pos == 8
    gen.prefill(_prompt(9, cfg.vocab_size))  # bucket 16 at position 8
    assert pg.replays == 3 and st.pos == 17
    gen.prefill(_prompt(10, cfg.vocab_size))  # bucket 16 at position 17: pads up to 33
    assert pg.replays == 4 and st.pos == 27
    gen.prefill(_prompt(10, cfg.vocab_size))  # bucket 16 at 27 would pass the 40-token context: eager
    assert pg.replays == 4 and st.pos == 37
    st.reset()
    gen.prefill(_prompt(17, cfg.vocab_size))  # bucket 64 > the context: eager
    assert pg.replays == 4 and st.pos == 17
    assert not pg.fits(0) and not pg.fits(65)
    st.reset()
    with pytest.raises(ValueError, match="does not take"):
        pg(_prompt(65, cfg.vocab_size))


def test_padding_needs_a_state(models):
    cfg, model = models[None]
    with pytest.raises(ValueError, match="needs a state"):
        model(torch.zeros(1, 4, dtype=torch.long), None, last_only=True, valid=torch.tensor([2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_graph_replay_equals_the_eager_prefill_on_cuda(tmp_path, kv):
    """On CUDA (bf16, q4 linears through the Triton kernels), for prompts of several lengths in two buckets,
    fresh and continuing a conversation, replay after replay: the captured graph gives the logits and state of
    the same padded forward run
    eagerly (same kernels, same shapes), and the logits of the plain eager prefill up to bf16 rounding
    (there the shapes differ: prompts of up to 8 tokens take the GEMV kernels); the chat's generator builds
    the graphs by default."""
    from olmo_local.runtime import make_generator

    cfg = tiny_config(num_key_value_heads=2, hidden_size=256, intermediate_size=512, linear_key_head_dim=32,
                      linear_value_head_dim=64, num_attention_heads=4, linear_num_key_heads=4,
                      linear_num_value_heads=4)
    model = _q4(load_model(write_checkpoint(hf_model(cfg, seed=1), cfg, tmp_path / "c"), "cuda", torch.bfloat16))
    states = [DecodeState(cfg, 256, "cuda", torch.bfloat16, kv_cache=kv) for _ in range(3)]
    st_e, st_p, st_g = states
    eager = Generator(model, st_e)
    padded = PrefillGraphs(model, st_p, use_graph=False)
    gen = make_generator(model, st_g)
    assert isinstance(gen.prefill_graphs, PrefillGraphs) and gen.prefill_graphs.use_graph
    for n, fresh in ((20, True), (31, True), (5, False), (32, False), (100, True), (20, False), (7, False)):
        if fresh:
            for st in states:
                st.reset()
        pos = st_g.pos
        ids = _prompt(n, cfg.vocab_size)
        plain, same, got = eager.prefill(ids).float(), padded(ids).float(), gen.prefill(ids).float()
        assert (got - same).abs().max().item() <= 1e-3 * (1 + same.abs().max().item()), (n, pos)
        _same_state(st_p, st_g, pos + n, rtol=1e-3)
        assert (got - plain).abs().max().item() <= 3e-2 * (1 + plain.abs().max().item()), (n, pos)
        assert st_e.pos == pos + n and st_e.tokens == st_g.tokens
    assert gen.prefill_graphs.replays == 7 and sorted(gen.prefill_graphs.graphs) == [16, 32, 128]
