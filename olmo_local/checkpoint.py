"""Checkpoints: resolve a model name, read safetensors tensor by tensor, validate, build the model, write.

Only safetensors is read (never pickle) and no code from a model repo is ever run. Files are
memory-mapped and each tensor is moved to the device on its own, so peak host RAM stays around the
largest tensor, not the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from olmo_local.config import FULL, OlmoHybridConfig
from olmo_local.errors import OlmoError

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]

# Load-time renames accepted from other exporters (spec §3 name aliases, pitfall P9).
ALIASES = [
    (re.compile(r"\.attention_layer_norm\."), ".input_layernorm."),
    (re.compile(r"\.feedforward_layer_norm\."), ".post_attention_layernorm."),
    (re.compile(r"\.linear_attn\.out_proj\."), ".linear_attn.o_proj."),
    (re.compile(r"\.linear_attn\.norm\."), ".linear_attn.o_norm."),
]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


# ---- resolving a model name ------------------------------------------------------------------
def resolve_model(name: str | os.PathLike) -> Path:
    """A local directory, ``demo`` (the bundled model), or a Hugging Face repo id (through the hub cache;
    downloaded only when the machine is online and HF_HUB_OFFLINE is not set)."""
    s = str(name)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if s == "demo":
        if (DEMO_DIR / "config.json").is_file():
            return DEMO_DIR
        raise OlmoError("the bundled demo model is missing from this installation")
    if p.exists():
        raise OlmoError(f"{s} is a file; give the checkpoint's directory")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", s):
        raise OlmoError(f"no such model directory: {s}")
    return _from_hub(s)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a runtime dependency
        raise OlmoError("huggingface_hub is not installed; give a local directory instead") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise OlmoError(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it on a connected machine or give a local directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network errors, 404, gated repos
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OlmoError(f"could not download {repo_id} from the Hugging Face hub: {first[:200]}") from None


def read_config(path: Path) -> OlmoHybridConfig:
    return OlmoHybridConfig.from_file(Path(path) / "config.json")


# ---- reading tensors ---------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    for pat, rep in ALIASES:
        name = pat.sub(rep, name)
    return name


class TensorReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint, by canonical name."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise OlmoError(f"{index} is not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
            if not files:
                if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                    raise OlmoError(f"{self.path} has only pickle checkpoints (.bin/.pt); olmo-local reads "
                                    "safetensors only (pickle can run code)")
                raise OlmoError(f"no model.safetensors in {self.path}")
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise OlmoError(f"checkpoint shard {fname} listed in the index is missing from {self.path}")
            try:
                h = safe_open(str(fpath), framework="pt")
                keys = list(h.keys())
            except Exception as e:
                raise OlmoError(f"{fpath} is corrupt or truncated ({str(e).splitlines()[0][:160]})") from None
            self._handles[fname] = h
            for k in keys:
                self._where[canonical_name(k)] = (fname, k)

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        f, k = self._where[name]
        return tuple(self._handles[f].get_slice(k).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        f, k = self._where[name]
        return _DTYPES.get(self._handles[f].get_slice(k).get_dtype())

    def locate(self, name: str) -> tuple[Path, str]:
        """The file holding ``name`` and the tensor's key in it (as stored, before aliasing)."""
        if name not in self._where:
            raise OlmoError(f"tensor {name} is missing from {self.path}")
        f, k = self._where[name]
        return self.path / f, k

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise OlmoError(f"tensor {name} is missing from {self.path}")
        f, k = self._where[name]
        try:
            return self._handles[f].get_tensor(k)
        except Exception as e:
            raise OlmoError(f"could not read {name} from {self.path / f} ({str(e)[:160]})") from None


# ---- the expected tensors ----------------------------------------------------------------------
def linear_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple[int, int]]:
    """Every linear layer (name prefix -> [out, in]) of the checkpoint, in HF names."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: dict[str, tuple[int, int]] = {}
    for i, t in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        if t == FULL:
            out.update({p + "self_attn.q_proj": (H * hd, d), p + "self_attn.k_proj": (KV * hd, d),
                        p + "self_attn.v_proj": (KV * hd, d), p + "self_attn.o_proj": (d, H * hd)})
        else:
            hv = cfg.linear_num_value_heads
            out.update({p + "linear_attn.q_proj": (cfg.key_dim, d), p + "linear_attn.k_proj": (cfg.key_dim, d),
                        p + "linear_attn.v_proj": (cfg.value_dim, d), p + "linear_attn.g_proj": (cfg.value_dim, d),
                        p + "linear_attn.o_proj": (d, cfg.value_dim), p + "linear_attn.a_proj": (hv, d),
                        p + "linear_attn.b_proj": (hv, d)})
        out.update({p + "mlp.gate_proj": (inter, d), p + "mlp.up_proj": (inter, d), p + "mlp.down_proj": (d, inter)})
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (cfg.vocab_size, d)
    return out


def plain_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple[int, ...]]:
    """Every non-linear tensor (full name -> shape); the conv weights in the split layout."""
    d = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i, t in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        if t == FULL:
            out.update({p + "self_attn.q_norm.weight": (cfg.num_attention_heads * cfg.head_dim,),
                        p + "self_attn.k_norm.weight": (cfg.num_key_value_heads * cfg.head_dim,),
                        p + "post_attention_layernorm.weight": (d,),
                        p + "post_feedforward_layernorm.weight": (d,)})
        else:
            K, hv = cfg.linear_conv_kernel_dim, cfg.linear_num_value_heads
            out.update({p + "linear_attn.q_conv1d.weight": (cfg.key_dim, 1, K),
                        p + "linear_attn.k_conv1d.weight": (cfg.key_dim, 1, K),
                        p + "linear_attn.v_conv1d.weight": (cfg.value_dim, 1, K),
                        p + "linear_attn.A_log": (hv,), p + "linear_attn.dt_bias": (hv,),
                        p + "linear_attn.o_norm.weight": (cfg.linear_value_head_dim,),
                        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    return out


def _conv_names(p: str) -> list[str]:
    return [p + f"linear_attn.{s}_conv1d.weight" for s in "qkv"]


def validate(reader: TensorReader, cfg: OlmoHybridConfig, linear_names: Callable[[str], list[str]]) -> None:
    """Raise one OlmoError listing every missing, unexpected and mis-shaped tensor."""
    missing, bad_shape = [], []
    expected: set[str] = set()
    plain = plain_shapes(cfg)
    for name, shape in plain.items():
        if name.endswith("q_conv1d.weight"):
            p = name[: -len("linear_attn.q_conv1d.weight")]
            fused = p + "linear_attn.conv1d.weight"
            if reader.has(fused) and not any(reader.has(n) for n in _conv_names(p)):
                expected.add(fused)
                want = (cfg.conv_dim, 1, cfg.linear_conv_kernel_dim)
                if reader.shape(fused) not in (want, want[::2]):
                    bad_shape.append(f"{fused} {list(reader.shape(fused))} != {list(want)}")
                continue
        if (name.endswith("k_conv1d.weight") or name.endswith("v_conv1d.weight")) and \
                reader.has(name.rsplit("linear_attn.", 1)[0] + "linear_attn.conv1d.weight"):
            continue
        if name == "model.embed_tokens.weight" and not reader.has(name):
            names = linear_names("model.embed_tokens")
            expected.update(names)
            missing.extend(n for n in names if not reader.has(n))
            continue
        expected.add(name)
        if not reader.has(name):
            missing.append(name)
        elif reader.shape(name) != shape and not (len(shape) == 3 and reader.shape(name) == (shape[0], shape[2])):
            bad_shape.append(f"{name} {list(reader.shape(name))} != {list(shape)}")
    for prefix, (n, k) in linear_shapes(cfg).items():
        names = linear_names(prefix)
        expected.update(names)
        missing.extend(x for x in names if not reader.has(x))
        w = prefix + ".weight"
        if w in names and reader.has(w) and reader.dtype(w) not in (torch.uint8, torch.int8) \
                and reader.shape(w) != (n, k):
            bad_shape.append(f"{w} {list(reader.shape(w))} != {[n, k]}")
    extra = sorted(set(reader.names()) - expected)
    if cfg.tie_word_embeddings:
        extra = [e for e in extra if not e.startswith("lm_head.")]  # some exporters save the tied copy
    problems = []
    if missing:
        problems.append(f"missing {_list(missing)}")
    if extra:
        problems.append(f"unexpected {_list(extra)}")
    if bad_shape:
        problems.append(f"wrong shape {_list(bad_shape)}")
    if problems:
        raise OlmoError(f"checkpoint {reader.path} does not match its config.json: " + "; ".join(problems))


def _list(items: list[str], n: int = 8) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{len(items)} tensor(s): " + ", ".join(items[:n]) + more


# ---- building the model ------------------------------------------------------------------------
def default_dtype(cfg: OlmoHybridConfig, device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16
    return torch.float32 if cfg.num_params() * 4 < 8 * 2**30 else torch.bfloat16


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               progress: Callable[[int, int], None] | None = None):
    """Load (and validate) an Olmo Hybrid checkpoint directory into an OlmoHybridModel."""
    from olmo_local.model import MLP, AttentionLayer, GDNLayer, Norm, OlmoHybridModel
    from olmo_local.quant.checkpoint import expected_names, load_linear

    path = Path(path)
    cfg = read_config(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OlmoError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    dtype = dtype or default_dtype(cfg, device)
    reader = TensorReader(path)

    def names_of(prefix: str) -> list[str]:
        if prefix == "model.embed_tokens":
            return [n for n in reader.names() if n.startswith("model.embed_tokens.")] or [prefix + ".weight"]
        fmt = _fmt(reader, prefix)
        extra = [prefix + ".weight_format"] if fmt == "bnb-int8" and reader.has(prefix + ".weight_format") else []
        return expected_names(prefix, fmt) + extra

    validate(reader, cfg, names_of)

    def get(name: str) -> torch.Tensor:
        return reader.get(name)

    shapes = linear_shapes(cfg)

    def lin(prefix: str) -> nn.Module:
        m = load_linear(get, reader.has, prefix, device, dtype)
        if (m.out_features, m.in_features) != shapes[prefix]:
            raise OlmoError(f"corrupt checkpoint: linear {prefix} is stored as [{m.out_features}, {m.in_features}], "
                            f"config.json says {list(shapes[prefix])}; re-download or re-quantize the model")
        return m

    def fused(prefixes: list[str]) -> nn.Module:
        mods = [lin(p) for p in prefixes]
        return type(mods[0]).cat_rows(mods)

    def vec(name: str, dt: torch.dtype | None = None) -> torch.Tensor:
        return get(name).to(device=device, dtype=dt or dtype)

    def norm(name: str, eps: float = cfg.rms_norm_eps) -> Norm:
        return Norm(vec(name), eps)

    layers: list[nn.Module] = []
    a_i = g_i = 0
    n = len(cfg.layer_types)
    for i, t in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        mlp = MLP(fused([p + "mlp.gate_proj", p + "mlp.up_proj"]), lin(p + "mlp.down_proj"))
        if t == FULL:
            s = p + "self_attn."
            layers.append(AttentionLayer(cfg, a_i, fused([s + "q_proj", s + "k_proj", s + "v_proj"]),
                                         lin(s + "o_proj"), norm(s + "q_norm.weight"), norm(s + "k_norm.weight"),
                                         norm(p + "post_attention_layernorm.weight"),
                                         norm(p + "post_feedforward_layernorm.weight"), mlp))
            a_i += 1
        else:
            s = p + "linear_attn."
            if reader.has(s + "conv1d.weight"):
                conv = get(s + "conv1d.weight")
            else:
                conv = torch.cat([get(x) for x in _conv_names(p)], 0)
            conv = conv.reshape(cfg.conv_dim, cfg.linear_conv_kernel_dim).to(device=device, dtype=dtype)
            ab = _dense_cat([get(s + "a_proj.weight"), get(s + "b_proj.weight")], device, dtype) \
                if _fmt(reader, s + "a_proj") == "bf16" == _fmt(reader, s + "b_proj") \
                else fused([s + "a_proj", s + "b_proj"])
            layers.append(GDNLayer(cfg, g_i, norm(p + "input_layernorm.weight"),
                                   fused([s + "q_proj", s + "k_proj", s + "v_proj", s + "g_proj"]), ab, conv,
                                   vec(s + "A_log", torch.float32), vec(s + "dt_bias", torch.float32),
                                   vec(s + "o_norm.weight"), lin(s + "o_proj"),
                                   norm(p + "post_attention_layernorm.weight"), mlp))
            g_i += 1
        if progress:
            progress(i + 1, n)
    embed = _load_embedding(reader, device, dtype)
    lm_head = None if cfg.tie_word_embeddings else lin("lm_head")
    if lm_head is None and hasattr(embed, "as_linear"):  # tied q8 table: the head reads the same int8 rows
        lm_head = embed.as_linear()
    model = OlmoHybridModel(cfg, layers, embed, Norm(vec("model.norm.weight"), cfg.rms_norm_eps), lm_head)
    model.source_path = path
    if device.type == "cuda":  # q4 linears in the decode GEMV's tiled layout (same bytes, read in long runs)
        from olmo_local.quant.linear import tile_q4_layers

        tile_q4_layers(model)
    return model.eval()


def _fmt(reader: TensorReader, prefix: str) -> str:
    """Which stored format the linear at ``prefix`` uses (from the names and dtypes present)."""
    if reader.has(prefix + ".qweight"):
        return "q4" if reader.has(prefix + ".mins") else "q8"
    if reader.has(prefix + ".weight.absmax"):
        return "nf4-dq" if reader.has(prefix + ".weight.nested_absmax") else "nf4"
    if reader.has(prefix + ".SCB"):
        return "bnb-int8"
    return "bf16"


def _dense_cat(ts: list[torch.Tensor], device, dtype) -> nn.Module:
    from olmo_local.quant.linear import DenseLinear
    return DenseLinear(torch.cat([t.to(dtype) for t in ts], 0).to(device))


def _load_embedding(reader: TensorReader, device, dtype) -> nn.Module:
    from olmo_local.model import Embedding
    if reader.has("model.embed_tokens.weight") and reader.dtype("model.embed_tokens.weight") not in (
            torch.int8, torch.uint8):
        return Embedding(reader.get("model.embed_tokens.weight").to(device=device, dtype=dtype))
    from olmo_local.quant.checkpoint import load_embedding
    return load_embedding(reader.get, reader.has, "model.embed_tokens", device, dtype)


# ---- writing -----------------------------------------------------------------------------------
def to_hf_tensors(model, split_conv: bool = True) -> dict[str, torch.Tensor]:
    """The weights of a dense OlmoHybridModel under transformers' names (inverse of the load-time fusing)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight.data,
                                    "model.norm.weight": model.norm.weight.data}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.dequantize()
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        gate, up = layer.mlp.gate_up.dequantize().chunk(2, 0)
        out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": layer.mlp.down.dequantize()})
        if cfg.layer_types[i] == FULL:
            q, k, v = layer.qkv.dequantize().split([H * hd, KV * hd, KV * hd], 0)
            s = p + "self_attn."
            out.update({s + "q_proj.weight": q, s + "k_proj.weight": k, s + "v_proj.weight": v,
                        s + "o_proj.weight": layer.o.dequantize(), s + "q_norm.weight": layer.q_norm.weight.data,
                        s + "k_norm.weight": layer.k_norm.weight.data,
                        p + "post_attention_layernorm.weight": layer.post_attn_norm.weight.data,
                        p + "post_feedforward_layernorm.weight": layer.post_ff_norm.weight.data})
        else:
            s = p + "linear_attn."
            q, k, v, g = layer.qkvz.dequantize().split([cfg.key_dim, cfg.key_dim, cfg.value_dim, cfg.value_dim], 0)
            a, b = layer.ab.dequantize().chunk(2, 0)
            conv = layer.conv_w.data.unsqueeze(1)
            if split_conv:
                cq, ck, cv = conv.split([cfg.key_dim, cfg.key_dim, cfg.value_dim], 0)
                out.update({s + "q_conv1d.weight": cq, s + "k_conv1d.weight": ck, s + "v_conv1d.weight": cv})
            else:
                out[s + "conv1d.weight"] = conv
            out.update({s + "q_proj.weight": q, s + "k_proj.weight": k, s + "v_proj.weight": v,
                        s + "g_proj.weight": g, s + "a_proj.weight": a, s + "b_proj.weight": b,
                        s + "o_proj.weight": layer.o.dequantize(), s + "A_log": layer.A_log.data,
                        s + "dt_bias": layer.dt_bias.data, s + "o_norm.weight": layer.o_norm_w.data,
                        p + "input_layernorm.weight": layer.in_norm.weight.data,
                        p + "post_attention_layernorm.weight": layer.post_norm.weight.data})
    return out


def write_safetensors(dst: Path, tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                      max_shard_bytes: int = 4 * 2**30) -> None:
    """Write tensors into dst (an existing directory) as model.safetensors or shards + index."""
    from safetensors.torch import save_file

    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in items:
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nb
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


class AtomicDir:
    """Write a directory atomically: build it in a temp dir beside dst, rename into place on success."""

    def __init__(self, dst: str | Path, force: bool = False) -> None:
        self.dst = Path(dst)
        self.force = force

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.force:
            raise OlmoError(f"{self.dst} already exists (use --force to overwrite)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a finished model dir is readable
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        return False


def save_checkpoint(dst: str | Path, config: dict | OlmoHybridConfig, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype | None = torch.bfloat16, force: bool = True,
                    max_shard_bytes: int = 4 * 2**30, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors (floating tensors cast to ``dtype``, A_log/dt_bias kept fp32 if
    they are) atomically."""
    cfg = config.to_dict() if isinstance(config, OlmoHybridConfig) else dict(config)

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        if dtype is None or not t.is_floating_point() or name.endswith(("A_log", "dt_bias")):
            return t
        return t.to(dtype)

    with AtomicDir(dst, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_safetensors(tmp, ((k, cast(k, v)) for k, v in tensors.items()), max_shard_bytes)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(dst)
