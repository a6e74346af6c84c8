"""Olmo Hybrid configuration (config.json, model_type "olmo_hybrid"), validated with clear errors.

Fields and defaults follow the spec (olmo-hybrid.md §2) and transformers' OlmoHybridConfig. RoPE is
off (NoPE) unless the config gives a numeric ``rope_theta`` at the top level or inside
``rope_parameters`` (pitfall P1: a null or missing theta must NOT turn RoPE on).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from olmo_local.errors import OlmoError

LINEAR = "linear_attention"
FULL = "full_attention"


@dataclass
class OlmoHybridConfig:
    vocab_size: int = 100352
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    layer_types: list[str] | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    rope_theta: float | None = None  # None = NoPE
    eos_token_id: list[int] = field(default_factory=lambda: [100257])
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # untouched keys (quantization_config, ...)

    # ---- derived -------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.layer_types is None:
            n = self.num_hidden_layers
            self.layer_types = [FULL if i % 4 == 3 else LINEAR for i in range(n)]
            if FULL not in self.layer_types and n > 0:
                self.layer_types[-1] = FULL
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.linear_num_key_heads is None:
            self.linear_num_key_heads = self.num_attention_heads
        if self.linear_num_value_heads is None:
            self.linear_num_value_heads = self.num_attention_heads
        if self.linear_key_head_dim is None and self.linear_num_key_heads:
            self.linear_key_head_dim = int(0.75 * self.hidden_size / self.linear_num_key_heads)
        if self.linear_value_head_dim is None and self.linear_key_head_dim:
            self.linear_value_head_dim = 2 * self.linear_key_head_dim
        self.validate()

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def key_dim(self) -> int:  # GDN q/k width
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:  # GDN v/z width
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def nope(self) -> bool:
        return self.rope_theta is None

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> OlmoError:
            return OlmoError(f"unsupported config.json: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(f"{name} must be a positive integer, got {v!r}")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act {self.hidden_act!r} (only 'silu' is supported)")
        if self.attention_bias:
            raise bad("attention_bias=true (Olmo Hybrid has no biases)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise bad(f"unknown layer types {unknown} (expected {LINEAR!r} or {FULL!r})")
        if not self.attn_layers or not self.gdn_layers:
            raise bad("Olmo Hybrid needs at least one linear_attention and one full_attention layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad(f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                      f"linear_num_key_heads {self.linear_num_key_heads}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise bad(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if self.rope_theta is not None:
            if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta)
                    and self.rope_theta > 0):
                raise bad(f"rope_theta must be a positive number or null, got {self.rope_theta!r}")
            if self.head_dim % 2:
                raise bad(f"RoPE needs an even head_dim, got {self.head_dim}")
        if any(not isinstance(e, int) for e in self.eos_token_id):
            raise bad(f"eos_token_id must be an int or a list of ints, got {self.eos_token_id!r}")

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OlmoHybridConfig":
        if not isinstance(d, dict):
            raise OlmoError("unsupported config.json: top level is not a JSON object")
        mt = d.get("model_type")
        if mt is not None and mt != "olmo_hybrid":
            raise OlmoError(f"unsupported model_type {mt!r}: olmo-local runs only 'olmo_hybrid' models")
        known = {f for f in cls.__dataclass_fields__ if f not in ("rope_theta", "extra", "eos_token_id")}
        kw: dict[str, Any] = {k: d[k] for k in known if k in d and d[k] is not None}
        if "layer_types" in d and d["layer_types"] is not None and not isinstance(d["layer_types"], list):
            raise OlmoError("unsupported config.json: layer_types must be a list")
        kw["rope_theta"] = _rope_theta(d)
        eos = d.get("eos_token_id", 100257)
        kw["eos_token_id"] = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        kw["extra"] = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__
                       and k not in ("rope_parameters", "rope_scaling")}
        try:
            return cls(**kw)
        except TypeError as e:  # wrong value types that dataclass arithmetic trips on
            raise OlmoError(f"unsupported config.json: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "OlmoHybridConfig":
        path = Path(path)
        if not path.is_file():
            raise OlmoError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OlmoError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        theta = d.pop("rope_theta")
        d["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
        d["model_type"] = "olmo_hybrid"
        d["architectures"] = ["OlmoHybridForCausalLM"]
        d.update(extra)
        return d

    def num_params(self) -> int:
        """Parameter count (embedding, head unless tied, all layers), as in spec §3."""
        d, inter, hd = self.hidden_size, self.intermediate_size, self.head_dim
        mlp = 3 * d * inter
        attn = (d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2
                + self.num_attention_heads * hd + self.num_key_value_heads * hd + 2 * d + mlp)
        gdn = (d * self.key_dim * 2 + d * self.value_dim * 3 + 2 * d * self.linear_num_value_heads
               + self.conv_dim * self.linear_conv_kernel_dim + 2 * self.linear_num_value_heads
               + self.linear_value_head_dim + 2 * d + mlp)
        emb = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + d + len(self.attn_layers) * attn + len(self.gdn_layers) * gdn


def _rope_theta(d: dict[str, Any]) -> float | None:
    """NoPE unless a numeric theta is given (pitfall P1)."""
    rp = d.get("rope_parameters")
    if rp is None:
        rp = d.get("rope_scaling")
    theta = None
    if isinstance(rp, dict):
        rtype = rp.get("rope_type", rp.get("type")) or "default"
        theta = rp.get("rope_theta")
        if theta is not None and rtype != "default":
            raise OlmoError(f"unsupported config.json: rope_type {rtype!r} (only plain RoPE or NoPE)")
    if theta is None:
        theta = d.get("rope_theta")
    if theta is None:
        return None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise OlmoError(f"unsupported config.json: rope_theta must be a number or null, got {theta!r}")
    return float(theta)


PRESETS: dict[str, dict[str, Any]] = {
    # the released 7B shape (spec §2)
    "7b": dict(vocab_size=100352, hidden_size=3840, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=30, num_key_value_heads=30, linear_num_key_heads=30,
               linear_num_value_heads=30, linear_key_head_dim=96, linear_value_head_dim=192),
    # a ~1B shape with the same proportions, for mid-size benchmarks
    "1b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, linear_num_key_heads=16,
               linear_num_value_heads=16, linear_key_head_dim=96, linear_value_head_dim=192),
    # tiny: fast tests on CPU; uses the real Dolma-2 vocabulary size
    "tiny": dict(vocab_size=100352, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, linear_num_key_heads=2,
                 linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=32,
                 max_position_embeddings=4096),
}


def preset(name: str, **overrides: Any) -> OlmoHybridConfig:
    if name not in PRESETS:
        raise OlmoError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return OlmoHybridConfig(**{**PRESETS[name], **overrides})
