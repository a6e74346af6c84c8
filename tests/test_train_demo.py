"""tools/train_demo.py: tokenizer, data split, chat turns and a few CPU training steps.

Runs on tests/fixtures/corpus_small.txt (the opening of Hamlet, public domain), never on ../shared.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo_data as dd  # noqa: E402
import train_demo  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "corpus_small.txt"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "corpus"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    text = FIXTURE.read_text(encoding="utf-8")
    a = dd.paragraph_cut(text, 34_000)
    b = dd.paragraph_cut(text, 42_000)
    # three disjoint pieces: a play, a second source and a wholly held-out one, as in the real corpus
    (d / "shakespeare.txt").write_text(text[:a], encoding="utf-8")
    (d / "austen.txt").write_text("EMMA\n\nBy Jane Austen\n\n" + text[a:b], encoding="utf-8")
    (d / "jargon.txt").write_text(text[b:], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_demo.main(["tokenizer", "--corpus", str(corpus), "--out", str(out), "--vocab", "512",
                     "--holdout-frac", "0.1"])
    return out


def test_tokenizer_special_tokens_and_round_trip(tokenizer_dir):
    tok = dd.load_tokenizer(tokenizer_dir)
    assert tok.get_vocab_size() == 512
    ids = {s: tok.token_to_id(s) for s in dd.SPECIAL_TOKENS}
    assert sorted(ids.values()) == [508, 509, 510, 511]  # the last four ids
    for s, i in ids.items():
        assert tok.encode(s, add_special_tokens=False).ids == [i]  # one id each, read out of text
    for text in ["To be, or not to be: that is the question.\n\n  1 In the beginning",
                 "naïve café — ‘quoted’ 12345 \t tabs\r\n", "<|im_start|>user\nHi<|im_end|>\n"]:
        enc = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(enc, skip_special_tokens=False) == text
    # no BOS/EOS added
    assert tok.encode("Hamlet", add_special_tokens=True).ids == tok.encode("Hamlet", add_special_tokens=False).ids

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|pad|>"
    assert cfg["chat_template"]
    stm = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert stm["eos_token"]["content"] == "<|endoftext|>"


def test_tokenizer_chat_template_matches_training_format(tokenizer_dir):
    from olmo_local.tokenizer import Tokenizer

    t = Tokenizer.from_dir(tokenizer_dir)
    msgs = [("system", "Be brief."), ("user", "Who's there?"), ("assistant", "Nay, answer me.")]
    rendered = t.apply_chat_template([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=True)
    assert rendered == dd.render_chat(msgs, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_is_deterministic(corpus, tokenizer_dir, tmp_path):
    train_demo.main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path), "--vocab", "512",
                     "--holdout-frac", "0.1"])
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / f).read_bytes() == (tokenizer_dir / f).read_bytes(), f


def test_split_never_trains_on_heldout(corpus):
    texts = dd.read_corpus(corpus)
    sp = dd.split_corpus(texts, 0.1)
    assert "jargon.txt" not in sp.train and sp.heldout["jargon.txt"] == texts["jargon.txt"]
    for name, text in texts.items():
        if name in sp.train:
            assert sp.train[name] + sp.heldout[name] == text
            assert 0.05 * len(text) < len(sp.heldout[name]) < 0.15 * len(text)
    train_blob = "\n".join(dd.training_documents(sp))
    chats = dd.chat_samples(sp.train["shakespeare.txt"])
    held = dd.heldout_text(sp)
    assert held.strip()
    for para in [p for p in held.split("\n\n") if len(p) > 200]:
        assert para not in train_blob
        assert not any(para in c for c in chats)


def test_chat_samples_are_well_formed(corpus):
    sp = dd.split_corpus(dd.read_corpus(corpus), 0.1)
    chats = dd.chat_samples(sp.train["shakespeare.txt"], seed=0)
    assert len(chats) > 20
    assert chats == dd.chat_samples(sp.train["shakespeare.txt"], seed=0)  # deterministic
    for c in chats:
        assert c.startswith(("<|im_start|>user\n", "<|im_start|>system\n")) and c.endswith("<|im_end|>\n")
        roles = [t.split("\n", 1)[0] for t in c.split("<|im_start|>")[1:]]
        body = [r for r in roles if r != "system"]
        assert body == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0
        assert "[" not in c  # stage directions dropped


def test_train_few_steps_on_cpu(corpus, tmp_path):
    out = tmp_path / "demo"
    train_demo.main(["train", "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
                     "--preset", "tiny", "--steps", "40", "--batch", "8", "--seq-len", "64",
                     "--log-every", "10", "--lr", "3e-3", "--holdout-frac", "0.1", "--threads", "1",
                     "--work-dir", str(tmp_path / "work"), "--time-budget-s", "0", "--seed", "1"])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "train_report.json"} <= files
    report = json.loads((out / "train_report.json").read_text())
    curve = [loss for _, loss in report["loss_curve"]]
    assert report["steps"] == 40
    assert curve[-1] < curve[0] - 0.5, curve
    assert np.isfinite(report["heldout"]["loss"])
    assert report["heldout"]["unigram_perplexity"] > 1

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "olmo_hybrid"
    assert cfg["rope_parameters"] == {"rope_theta": None}
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg["vocab_size"] % 128 == 0 and cfg["tie_word_embeddings"] is True
    from tokenizers import Tokenizer as HFTok
    t = HFTok.from_file(str(out / "tokenizer.json"))
    assert cfg["eos_token_id"] == [t.token_to_id("<|endoftext|>"), t.token_to_id("<|im_end|>")]
    assert cfg["pad_token_id"] == t.token_to_id("<|pad|>")

    # the runtime loads what the trainer wrote, tensor names and bf16 included
    import torch
    from safetensors import safe_open

    from olmo_local.checkpoint import load_model
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "model.layers.0.linear_attn.q_conv1d.weight" in names and "lm_head.weight" not in names
    m = load_model(out, device="cpu", dtype=torch.float32)
    x = torch.tensor([t.encode("Who's there?").ids])
    assert torch.isfinite(m(x)).all()


def test_shipped_heldout_text():
    ev = ROOT / "olmo_local" / "assets" / "eval"
    text = (ev / "heldout.txt").read_text(encoding="utf-8")
    assert 250_000 < len(text.encode()) < 350_000
    assert "public domain" in (ev / "NOTICE.md").read_text(encoding="utf-8")
    if not SHARED_CORPUS.is_dir():
        pytest.skip("no ../shared/data/corpus: cannot regenerate heldout.txt")
    sp = dd.split_corpus(dd.read_corpus(SHARED_CORPUS), 0.02)
    assert hashlib.sha256(dd.heldout_text(sp).encode()).digest() == hashlib.sha256(text.encode()).digest()
