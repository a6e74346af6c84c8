"""Every checkpoint-loading error a user can cause gives one OlmoError naming the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_ref import hf_model, tiny_config, write_checkpoint
from olmo_local.checkpoint import load_model, resolve_model
from olmo_local.config import OlmoHybridConfig
from olmo_local.errors import OlmoError


@pytest.fixture
def ckpt(tmp_path):
    cfg = tiny_config()
    return write_checkpoint(hf_model(cfg, seed=1), cfg, tmp_path / "ck")


def _edit_tensors(path, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def test_missing_extra_misshaped_listed_together(ckpt):
    def edit(t):
        del t["model.layers.0.linear_attn.A_log"]
        del t["model.layers.3.self_attn.q_norm.weight"]
        t["model.layers.0.bogus.weight"] = torch.zeros(3)
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    _edit_tensors(ckpt, edit)
    with pytest.raises(OlmoError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "missing 2 tensor(s)" in msg and "A_log" in msg and "q_norm" in msg
    assert "unexpected 1 tensor(s): model.layers.0.bogus.weight" in msg
    assert "wrong shape" in msg and "up_proj" in msg and "\n" not in msg


def test_truncated_and_corrupt_files(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(OlmoError, match="corrupt or truncated"):
        load_model(ckpt)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OlmoError, match="corrupt or truncated"):
        load_model(ckpt)


def test_no_weights_pickle_only_and_bad_config(tmp_path, ckpt):
    (ckpt / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(OlmoError, match="no model.safetensors"):
        load_model(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OlmoError, match="pickle"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(OlmoError, match="not valid JSON"):
        load_model(ckpt)


def test_missing_shard_in_index(tmp_path):
    cfg = tiny_config()
    p = write_checkpoint(hf_model(cfg), cfg, tmp_path / "sh", max_shard_bytes=30_000)
    shard = sorted(p.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(OlmoError, match="missing"):
        load_model(p)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "unsupported model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["linear_attention"] * 4}, "at least one"),
    ({"layer_types": ["linear_attention"] * 3}, "3 entries for 4 layers"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"linear_num_value_heads": 3}, "not a multiple"),
    ({"rope_parameters": {"rope_theta": 10000, "rope_type": "yarn"}}, "rope_type"),
    ({"rope_parameters": {"rope_theta": "big"}}, "rope_theta"),
    ({"hidden_size": -4}, "positive integer"),
])
def test_config_validation(change, match):
    d = tiny_config().to_dict()
    d.update(change)
    with pytest.raises(OlmoError, match=match):
        OlmoHybridConfig.from_dict(d)


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(OlmoError, match="no such model directory"):
        resolve_model(str(tmp_path / "nope"))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OlmoError, match="is a file"):
        resolve_model(str(f))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OlmoError, match="not in the Hugging Face cache"):
        resolve_model("allenai/Olmo-Hybrid-7B")


def test_hub_cache_is_used_offline(tmp_path, monkeypatch, ckpt):
    """A repo already in the Hugging Face cache resolves with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny" / "refs" / "main").write_text("a" * 40)
    import importlib

    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    importlib.reload  # noqa: B018 - keep linters quiet about the import
    assert resolve_model("someorg/tiny") == snap
    assert load_model(resolve_model("someorg/tiny")).config.hidden_size == 48


def test_config_json_roundtrip_is_loadable_by_transformers():
    from transformers import OlmoHybridConfig as HF
    cfg = tiny_config(rope_theta=None)
    hf = HF.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert hf.rope_parameters.get("rope_theta") is None
