"""The documented path: `olmo-local init-random DIR --preset tiny`, then `olmo-local generate` gives the
same greedy text as transformers; `info` and error handling (one line, non-zero exit, no traceback)."""

import os
import subprocess
import sys

import pytest
import torch

from hf_ref import hf_from_dir
from olmo_local.tokenizer import Tokenizer


def run(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # the CPU path, even on a GPU box
    return subprocess.run([sys.executable, "-m", "olmo_local.cli", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    r = run("init-random", str(d), "--preset", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return d


def test_generate_greedy_matches_transformers(tiny):
    tok = Tokenizer.from_dir(tiny)
    prompt = "The quick brown fox"
    r = run("generate", str(tiny), prompt, "--temperature", "0", "-n", "24", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    ref = hf_from_dir(tiny)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                           eos_token_id=sorted(tok.stop_ids), pad_token_id=0)[0, len(ids):].tolist()
    out = [t for t in out if t not in tok.stop_ids]
    assert r.stdout == tok.decode(out, skip_special=True) + "\n"


def test_generate_raw_from_stdin_and_seeded_sampling(tiny):
    a = run("generate", str(tiny), "-", "--raw", "--seed", "4", "-n", "12", "-q", stdin="Once upon a time")
    b = run("generate", str(tiny), "-", "--raw", "--seed", "4", "-n", "12", "-q", stdin="Once upon a time")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip() and a.stderr == ""


def test_info(tiny):
    r = run("info", str(tiny), "--ctx", "1000")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "NoPE" in r.stdout and "KV cache per token" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (("generate", "/nonexistent/dir", "hi"), "no such model directory"),
    (("generate", "TINY", "hi", "--device", "cuda"), "no CUDA GPU"),
    (("generate", "TINY", "hi", "--top-p", "0"), "top_p"),
    (("generate", "TINY", "hi", "--ctx", "999999"), "max_position_embeddings"),
    (("init-random", "TINY"), "already exists"),
    (("init-random", "/tmp/olmo-x", "--preset", "huge"), "unknown preset"),
])
def test_user_errors_are_one_line(tiny, args, msg):
    r = run(*[str(tiny) if a == "TINY" else a for a in args])
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
