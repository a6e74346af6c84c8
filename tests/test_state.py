"""DecodeState: snapshot/restore gives identical continuations; continuing a conversation equals a full
re-prefill of the same text; context-full is a clear error."""

import pytest
import torch

from hf_ref import hf_model, tiny_config, write_checkpoint
from olmo_local.checkpoint import load_model
from olmo_local.errors import OlmoError
from olmo_local.generate import Generator, SamplingParams
from olmo_local.state import DecodeState


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=3), cfg, tmp_path_factory.mktemp("m") / "c")
    return load_model(path, "cpu", torch.float32)


def test_snapshot_restore_same_tokens(model):
    g = Generator(model, DecodeState(model.config, 256))
    g.prefill([1, 2, 3, 4, 5, 6, 7])
    snap = g.state.snapshot()
    sp = SamplingParams(temperature=0.9, seed=11, max_new_tokens=30)
    first = g.generate([8], sp)
    g.state.restore(snap)
    assert g.state.pos == 7 and g.state.tokens == [1, 2, 3, 4, 5, 6, 7]
    calls = g.prefill_calls
    second = g.generate([8], sp)
    assert first == second and len(first) == 30
    assert g.prefill_calls == calls + 1  # only the one new token was fed, no re-prefill of the history


def test_continuation_equals_full_reprefill(model):
    cfg = model.config
    turn1, turn2 = list(range(10, 60)), list(range(200, 233))
    g = Generator(model, DecodeState(cfg, 256))
    reply = g.generate(turn1, SamplingParams(temperature=0, max_new_tokens=12))
    # continue: feed the unfed last reply token + the next turn only
    history = g.state.tokens
    full = turn1 + reply + turn2
    assert full[:len(history)] == history
    with torch.no_grad():
        cont = model(torch.tensor([full[len(history):]]), g.state)[0, -1]
        fresh = model(torch.tensor([full]))[0, -1]
    assert (cont - fresh).abs().max().item() < 1e-4
    assert g.state.common_prefix(full) == len(full)


def test_context_full_is_clear(model):
    g = Generator(model, DecodeState(model.config, 16))
    with pytest.raises(OlmoError, match="context full"):
        g.prefill(list(range(17)))
    out = g.generate(list(range(10)), SamplingParams(temperature=0, max_new_tokens=100))
    assert g.stats.stop_reason == "context" and g.state.pos == 16 and len(out) == 7


def test_state_sizes_match_spec_for_7b():
    from olmo_local.config import preset
    cfg = preset("7b")
    assert DecodeState.bytes_per_token(cfg, torch.bfloat16) == 122_880
    assert DecodeState.fixed_bytes(cfg, torch.bfloat16) == 53_084_160 + 1_658_880
    assert cfg.num_params() == 7_430_870_688
