"""Parity with transformers' OlmoHybridForCausalLM (the reference), fp32 on CPU, on tiny random
checkpoints written by the tests: prefill logits and 64 token-by-token decode steps, max |Δlogit| ≤ 1e-4,
and identical greedy generations."""

from __future__ import annotations

import pytest
import torch

from hf_ref import hf_model, tiny_config, write_checkpoint
from olmo_local.checkpoint import load_model
from olmo_local.generate import Generator, SamplingParams
from olmo_local.state import DecodeState

TOL = 1e-4

CASES = {
    "nope-untied-split": dict(cfg={}, ckpt={}),
    "rope-tied-fused": dict(cfg=dict(rope_theta=10000.0, tie_word_embeddings=True), ckpt=dict(split_conv=False)),
    "gqa-hv>hk-sharded": dict(cfg=dict(num_key_value_heads=2, linear_num_key_heads=1, linear_num_value_heads=2),
                              ckpt=dict(max_shard_bytes=40_000)),
    "aliases-8layers": dict(cfg=dict(num_hidden_layers=8, rope_theta=500000.0, num_key_value_heads=1),
                            ckpt=dict(aliases=True)),
}


def _hf_decode_logits(ref, ids: torch.Tensor, n_prefill: int) -> list[torch.Tensor]:
    out = ref(ids[:, :n_prefill], use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    logits = []
    for t in range(n_prefill, ids.shape[1]):
        out = ref(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits.append(out.logits[0, -1])
    return logits


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_transformers(case, tmp_path):
    cfg = tiny_config(**CASES[case]["cfg"])
    ref = hf_model(cfg, seed=list(CASES).index(case))
    path = write_checkpoint(ref, cfg, tmp_path / "ckpt", **CASES[case]["ckpt"])
    if "max_shard_bytes" in CASES[case]["ckpt"]:
        assert (path / "model.safetensors.index.json").is_file()
    ours = load_model(path, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 150 + 64), generator=gen)
    with torch.no_grad():
        # prefill over 150 tokens = 3 chunks of the delta rule, odd tail
        want = ref(ids[:, :150]).logits
        got = ours(ids[:, :150])
        assert (want - got).abs().max().item() <= TOL
        # the stateful path, prefilled in two uneven pieces, then 64 single-token steps
        state = DecodeState(cfg, 512)
        ours(ids[:, :37], state)
        ours(ids[:, 37:150], state)
        ref_steps = _hf_decode_logits(ref, ids, 150)
        worst = 0.0
        for i, t in enumerate(range(150, 150 + 64)):
            got = ours(ids[:, t:t + 1], state)[0, -1]
            worst = max(worst, (got - ref_steps[i]).abs().max().item())
        assert worst <= TOL, f"decode max |Δlogit| {worst}"
        assert state.pos == 150 + 64


def test_greedy_generation_identical_to_transformers(tmp_path):
    cfg = tiny_config(num_hidden_layers=8)
    ref = hf_model(cfg, seed=7)
    ours = load_model(write_checkpoint(ref, cfg, tmp_path / "c"), "cpu", torch.float32)
    prompt = [5, 17, 99, 3 + 1, 250, 11, 42]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, min_new_tokens=40,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    g = Generator(ours, DecodeState(cfg, 256))
    got = g.generate(prompt, SamplingParams(temperature=0, max_new_tokens=40))
    assert got == want


def test_hf_config_trap_nope_is_default():
    """A config with a null rope_parameters / no rope keys is NoPE for us (pitfall P1)."""
    from olmo_local.config import OlmoHybridConfig
    base = tiny_config().to_dict()
    for variant in ({"rope_parameters": None}, {"rope_parameters": {"rope_theta": None}}, {"rope_theta": None},
                    {"rope_parameters": {"rope_type": None}}):
        d = {k: v for k, v in base.items() if k != "rope_parameters"}
        d.update(variant)
        assert OlmoHybridConfig.from_dict(d).rope_theta is None
    d = dict(base, rope_parameters={"rope_theta": 500000, "rope_type": "default"})
    assert OlmoHybridConfig.from_dict(d).rope_theta == 500000.0
    d = {k: v for k, v in base.items() if k != "rope_parameters"}
    d["rope_theta"] = 10000
    assert OlmoHybridConfig.from_dict(d).rope_theta == 10000.0


def test_parity_script_on_the_demo_model_agrees_with_transformers_fp32():
    """scripts/gpu_parity.py (the GPU agreement measurement) on CPU, demo model, held-out prompts: its
    transformers-fp32 row is teacher-forced on our fp32 greedy tokens, so it must hit every one of them;
    each row reports one hit per step; the prompts are distinct held-out windows."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_parity", root / "scripts" / "gpu_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from olmo_local.checkpoint import resolve_model
    from olmo_local.tokenizer import Tokenizer

    ps = mod.heldout_prompts(Tokenizer.from_dir(resolve_model("demo")), 3, 50)
    assert [len(p) for p in ps] == [50, 50, 50] and len({tuple(p) for p in ps}) == 3
    assert mod.margin(torch.tensor([0.0, 3.0, 2.5, -1.0])) == pytest.approx(0.5)

    out = subprocess.run([sys.executable, str(root / "scripts" / "gpu_parity.py"), "--model", "demo", "--device",
                          "cpu", "--steps", "12", "--prompts", "2", "--hf", "--no-q4"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:42].strip(): line[42:].split() for line in out.stdout.splitlines()
            if line.startswith(("transformers", "bf16 weights"))}
    assert set(rows) == {"transformers fp32, eager (its cache)", "transformers bf16, eager (its cache)",
                         "bf16 weights, eager forward", "bf16 weights, graph step, bf16 KV",
                         "bf16 weights, graph step, int8 KV"}
    fp32 = rows["transformers fp32, eager (its cache)"]
    assert fp32[0] == "100.00%" and fp32[2] == "0" and float(fp32[5]) < 1e-5  # agree, misses, rel err
    for cols in rows.values():
        assert 0 <= int(cols[2]) <= 24 and float(cols[5]) < 0.05
