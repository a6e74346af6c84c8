"""Test helpers: tiny random Olmo Hybrid checkpoints written by the tests themselves, and the
transformers reference model (OlmoHybridForCausalLM) with the very same weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from olmo_local.checkpoint import write_safetensors
from olmo_local.config import OlmoHybridConfig


def tiny_config(**kw) -> OlmoHybridConfig:
    base = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, linear_num_key_heads=2, linear_num_value_heads=2,
                linear_key_head_dim=12, linear_value_head_dim=20, max_position_embeddings=1024,
                eos_token_id=[3], pad_token_id=1)
    base.update(kw)
    return OlmoHybridConfig(**base)


def hf_model(cfg: OlmoHybridConfig, seed: int = 0):
    """A transformers OlmoHybridForCausalLM with random weights (norm/gate weights randomised too, so
    that mistakes in where they apply show up), fp32, eval mode."""
    from transformers import OlmoHybridConfig as HFConfig, OlmoHybridForCausalLM

    d = cfg.to_dict()
    d.pop("head_dim", None) if cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads else None
    hcfg = HFConfig.from_dict(d)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = OlmoHybridForCausalLM(hcfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.0, 2.5, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    if cfg.rope_theta is None:
        assert model.model.rotary_emb is None, "reference model has RoPE on: config trap P1"
    else:
        assert model.model.rotary_emb is not None
    return model


def write_checkpoint(model, cfg: OlmoHybridConfig, path: Path, split_conv: bool = True,
                     max_shard_bytes: int = 4 * 2**30, aliases: bool = False) -> Path:
    """Write the HF model's weights with our own safetensors writer (transformers 5.24's save_pretrained
    writes wrong conv shapes for this model)."""
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = {}
    for k, v in sd.items():
        if k.endswith("linear_attn.conv1d.weight") and split_conv:
            p = k[: -len("conv1d.weight")]
            q, kk, vv = v.split([cfg.key_dim, cfg.key_dim, cfg.value_dim], 0)
            out[p + "q_conv1d.weight"], out[p + "k_conv1d.weight"], out[p + "v_conv1d.weight"] = q, kk, vv
            continue
        if aliases:
            k = k.replace(".input_layernorm.", ".attention_layer_norm.")
        out[k] = v
    write_safetensors(path, out, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return path


def hf_from_dir(path: Path):
    """transformers' model with the weights of a checkpoint directory we wrote (fp32)."""
    from transformers import OlmoHybridConfig as HFConfig, OlmoHybridForCausalLM

    from olmo_local.checkpoint import TensorReader, read_config

    cfg = read_config(path)
    hcfg = HFConfig.from_dict(json.loads((path / "config.json").read_text()))
    hcfg._attn_implementation = "eager"
    model = OlmoHybridForCausalLM(hcfg).float().eval()
    r = TensorReader(path)
    sd = {}
    for name in r.names():
        if name.endswith("q_conv1d.weight"):
            p = name[: -len("q_conv1d.weight")]
            sd[p + "conv1d.weight"] = torch.cat([r.get(p + f"{s}_conv1d.weight") for s in "qkv"], 0).float()
        elif not name.endswith(("k_conv1d.weight", "v_conv1d.weight")):
            sd[name] = r.get(name).float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing) == cfg.tie_word_embeddings or not missing
    return model
