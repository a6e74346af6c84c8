"""olmo_local.eval: windows, perplexity against a hand computation, KLD / same-top against a reference,
and the `olmo-local eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from olmo_local import eval as ev
from olmo_local.checkpoint import load_model
from olmo_local.errors import OlmoError
from olmo_local.tokenizer import Tokenizer
from test_quant_cmd import cli, make_source

N_VALID = 260  # the byte tokenizer's ids; the embedding has 384 rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("ev") / "m", seed=2)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("ev") / "o", seed=3)


@pytest.fixture(scope="module")
def windows(model_dir):
    _, text = ev.read_text(None)
    return ev.tokenize_windows(Tokenizer.from_dir(model_dir), text, tokens=300, window=100)


def test_windows_are_spread_over_the_text():
    ids = list(range(1000))
    w = ev.make_windows(ids, tokens=400, window=100)
    assert w.shape == (4, 100)
    assert w[0, 0] == 0 and w[-1, -1] == 999  # first at the start, last at the end
    starts = w[:, 0].tolist()
    assert starts == [0, 300, 600, 900]
    assert all(torch.equal(r, torch.arange(s, s + 100)) for r, s in zip(w, starts))
    assert ev.make_windows(ids, tokens=10**6, window=100).shape == (10, 100)  # all non-overlapping windows
    assert ev.make_windows(ids[:50], tokens=400, window=100).shape == (1, 50)  # short text: one window
    assert ev.make_windows(ids, tokens=150, window=100).shape == (1, 100)
    for bad in (dict(tokens=1), dict(window=1)):
        with pytest.raises(OlmoError):
            ev.make_windows(ids, **{"tokens": 400, "window": 100, **bad})
    with pytest.raises(OlmoError, match="too short"):
        ev.make_windows([5], 400, 100)


def test_default_text_ships_and_is_long_enough():
    path, text = ev.read_text(None)
    assert path == ev.DEFAULT_TEXT and len(text) > 100_000
    with pytest.raises(OlmoError, match="no such text file"):
        ev.read_text("/nonexistent/heldout.txt")


def test_perplexity_equals_hand_computation(model_dir, windows):
    model = load_model(model_dir, "cpu", torch.float32)
    st = ev.evaluate(model, windows, N_VALID)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:  # a fresh forward per window, every next token scored, padding ids excluded
            logits = model(w[None])[0, :-1, :N_VALID].double()
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            n += len(w) - 1
    assert st.tokens == n == 3 * 99
    assert st.nll == pytest.approx(nll / n, rel=1e-6)
    assert st.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert st.kld_mean is None and st.same_top_pct is None


def test_kld_of_a_model_with_itself_is_zero(model_dir, windows):
    model = load_model(model_dir, "cpu", torch.float32)
    with ev.Reference.build(model, windows, N_VALID) as ref:
        st = ev.evaluate(model, windows, N_VALID, ref)
        assert st.kld_mean == 0.0 and st.kld_p99 == 0.0 and st.kld_max == 0.0
        assert st.same_top_pct == 100.0
        assert st.ppl == pytest.approx(ref.stats.ppl, rel=1e-12)


def test_kld_and_same_top_match_torch(model_dir, other_dir, windows, monkeypatch):
    a = load_model(model_dir, "cpu", torch.float32)
    b = load_model(other_dir, "cpu", torch.float32)
    monkeypatch.setattr(ev, "_RAM_CACHE_BYTES", 0)  # the reference goes to a file
    ref = ev.Reference.build(a, windows, N_VALID)
    f = ref._file
    assert f is not None and f.is_file()
    st = ev.evaluate(b, windows, N_VALID, ref)
    ref.close()
    assert not f.exists()
    klds, same = [], 0
    with torch.no_grad():
        for w in windows:
            la = a(w[None])[0, :-1, :N_VALID].double().log_softmax(-1)
            lb = b(w[None])[0, :-1, :N_VALID].double().log_softmax(-1)
            klds.append(F.kl_div(lb, la, log_target=True, reduction="none").sum(-1))
            same += int((la.argmax(-1) == lb.argmax(-1)).sum())
    k = torch.cat(klds)
    assert st.kld_mean == pytest.approx(k.mean().item(), rel=1e-4)
    assert st.kld_p99 == pytest.approx(torch.quantile(k, 0.99).item(), rel=1e-4)
    assert st.same_top_pct == pytest.approx(100 * same / k.numel())
    assert st.kld_mean > 0.01 and st.same_top_pct < 100  # two different models


def test_eval_command(model_dir, other_dir, tmp_path, capsys, windows):
    rc, out, err = cli(capsys, "eval", model_dir, "--tokens", "300", "--window", "100", "--device", "cpu",
                       "--json", tmp_path / "a.json")
    assert rc == 0, err
    assert "perplexity" in out and "KLD" in out
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["windows"] == 3 and res["scored_tokens"] == 297 and len(res["rows"]) == 1
    want = ev.evaluate(load_model(model_dir, "cpu", torch.float32), windows, N_VALID)
    assert res["rows"][0]["ppl"] == pytest.approx(want.ppl, rel=1e-7)
    rc, out, err = cli(capsys, "eval", model_dir, "-r", other_dir, "--tokens", "300", "--window", "100",
                       "--device", "cpu", "--json", tmp_path / "b.json")
    assert rc == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["kld_mean"] is None and rows[1]["kld_mean"] > 0
    assert rows[1]["ppl"] == pytest.approx(want.ppl, rel=1e-7)
    text = tmp_path / "t.txt"
    text.write_text("abc " * 200)
    rc, out, err = cli(capsys, "eval", model_dir, "--text", text, "--tokens", "128", "--window", "64",
                       "--device", "cpu", "--json", tmp_path / "c.json")
    assert rc == 0 and json.loads((tmp_path / "c.json").read_text())["scored_tokens"] == 2 * 63


def test_eval_errors_are_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    cases = ((("--text", bad), "not UTF-8"), (("--text", tmp_path / "none.txt"), "no such text file"),
             (("--window", "1"), "--window"), (("-r", tmp_path / "nodir"), "no such model directory"))
    for args, msg in cases:
        rc, out, err = cli(capsys, "eval", model_dir, *args, "--device", "cpu")
        assert rc == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
