"""The shipped demo model: loads and generates offline, and its held-out perplexity stays within 2% of the
recorded values in bf16 and through the quantized paths (a regression guard for the model code, the
tokenizer and the quantized formats)."""

import os
import subprocess
import sys

import pytest
import torch

from olmo_local.checkpoint import DEMO_DIR, load_model
from olmo_local.eval import evaluate, read_text, tokenize_windows
from olmo_local.quantize_cmd import QuantOptions, write_quantized
from olmo_local.tokenizer import Tokenizer

# `olmo-local eval` default slice of olmo_local/assets/eval/heldout.txt (16 windows x 512 tokens, fp32),
# recorded on 2026-11-26 (README "Demo model"). Unigram perplexity of the same text: 1354.1.
RECORDED = {"bf16": 218.34, "q8": 218.03, "q4": 224.17, "nf4": 223.98}


@pytest.fixture(scope="module")
def windows():
    tok = Tokenizer.from_dir(DEMO_DIR)
    return tokenize_windows(tok, read_text(None)[1]), min(tok.vocab_size, 8192)


def test_demo_generates_english_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "olmo_local.cli", "generate", "demo",
                        "What news from the court, good sir?", "--temperature", "0", "-n", "30"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    words = [w for w in r.stdout.split() if w.strip(".,;:!?'\"").isalpha()]
    assert len(words) >= 4, r.stdout
    assert "ttft" in r.stderr


def test_demo_heldout_perplexity_is_recorded_value(windows):
    w, n_valid = windows
    st = evaluate(load_model(DEMO_DIR, "cpu", torch.float32), w, n_valid)
    assert abs(st.ppl / RECORDED["bf16"] - 1) < 0.02
    assert st.ppl < 1354.1 / 4  # clearly below the unigram model of the same tokenizer


@pytest.mark.parametrize("fmt", ["q8", "q4", "nf4"])
def test_demo_quantized_perplexity_is_recorded_value(windows, tmp_path, fmt):
    out = tmp_path / fmt
    out.mkdir()
    write_quantized(DEMO_DIR, out, QuantOptions(fmt))
    w, n_valid = windows
    st = evaluate(load_model(out, "cpu", torch.float32), w, n_valid)
    assert abs(st.ppl / RECORDED[fmt] - 1) < 0.02, st.ppl
