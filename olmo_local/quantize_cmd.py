"""``olmo-local quantize SRC DST``: a bf16/fp16/fp32 checkpoint -> a 4/8-bit one, plus a quality report.

What goes where (tensor names: quant/checkpoint.py, layouts: docs/contracts.md):

- every decoder linear (attention q/k/v/o, GDN q/k/v/g/o, MLP gate/up/down) in ``--format``: q4 (groups
  of ``--group-size``; a linear whose input width is not a multiple of it uses the largest of 64/32 that
  divides it, else q8; recorded in the report), q8 (int8 with an fp16 scale per group of
  ``--group-size`` inputs, the same fallback to 64/32, and one scale per row where none divides or with
  ``--group-size 0``), or nf4 (bitsandbytes, blocksize 64);
- lm_head 8-bit by default (``--lm-head q4|bf16``); the embedding as q8 (``--embed bf16``); q8 parts of
  q4 / nf4 checkpoints use groups of 128 whatever ``--group-size`` says (it sets q4's groups); for nf4
  both default to bf16 so the result is exactly what transformers + bitsandbytes write;
- with tied embeddings the one table serves as both, stored once in the more precise of the two choices;
- small tensors stay high precision: norms, conv weights and the GDN a/b projections in bf16 (or fp16
  when the source is fp16), A_log / dt_bias in fp32.

Memory: source tensors are read one at a time with plain file reads (no mmap, so the process's RSS is
what it really holds), quantized, and appended to per-dtype spill files; a shard is assembled from
them (header + data, streamed) when it is full. Peak host RAM is about one source tensor plus its
quantized form plus the quantizer's bounded temporaries.

DST is written atomically: everything goes to a hidden temporary directory beside DST that is renamed
into place at the very end; Ctrl-C / SIGTERM remove it. Only SIGKILL can leave the temporary
directory behind (named ``.DST.tmp-*``, never read by anything).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from olmo_local.errors import OlmoError

FORMATS = ("q4", "q8", "nf4")
HEAD_FORMATS = ("q8", "q4", "bf16")
EMBED_FORMATS = ("q8", "bf16")
DEFAULT_MAX_SHARD = 4 * 2**30
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")
COPY_GLOBS = ("LICENSE*", "NOTICE*")
_PRECISE = {"bf16": 3, "q8": 2, "q4": 1}

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


# ---- options and the per-tensor plan ------------------------------------------------------------
@dataclass
class QuantOptions:
    fmt: str
    group_size: int = 128
    lm_head: str | None = None  # None: q8 (bf16 for nf4)
    embed: str | None = None  # None: q8 (bf16 for nf4)
    double_quant: bool = False

    def __post_init__(self) -> None:
        from olmo_local.quant.formats import Q4_GROUP_SIZES, Q8_GROUP_SIZES

        if self.fmt not in FORMATS:
            raise OlmoError(f"unknown --format {self.fmt!r} (choose {', '.join(FORMATS)})")
        if self.fmt == "q8":
            if self.group_size not in (0, *Q8_GROUP_SIZES):
                sizes = ", ".join(map(str, Q8_GROUP_SIZES))
                raise OlmoError(f"--group-size for q8 must be one of {sizes} or 0 (one scale per row), "
                                f"got {self.group_size}")
        elif self.group_size not in Q4_GROUP_SIZES:
            sizes = ", ".join(map(str, Q4_GROUP_SIZES))
            raise OlmoError(f"--group-size must be one of {sizes}, got {self.group_size}")
        if self.lm_head is None:
            self.lm_head = "bf16" if self.fmt == "nf4" else "q8"
        if self.embed is None:
            self.embed = "bf16" if self.fmt == "nf4" else "q8"
        if self.lm_head not in HEAD_FORMATS:
            raise OlmoError(f"unknown --lm-head {self.lm_head!r} (choose {', '.join(HEAD_FORMATS)})")
        if self.embed not in EMBED_FORMATS:
            raise OlmoError(f"unknown --embed {self.embed!r} (choose {', '.join(EMBED_FORMATS)})")
        if self.double_quant and self.fmt != "nf4":
            raise OlmoError("--double-quant applies to --format nf4 only")

    @property
    def q8_group_size(self) -> int:
        """Group size of every q8 part (linears, lm_head, embedding): --group-size with --format q8, else
        128 (q4's --group-size is for the 4-bit codes; the q8 table of a q4 g32 model stays at 8.125 bits)."""
        return self.group_size if self.fmt == "q8" else 128

    @property
    def label(self) -> str:
        if self.fmt == "q4":
            return f"q4 g{self.group_size}"
        if self.fmt == "nf4":
            return "nf4" + (" dq" if self.double_quant else "")
        return f"q8 g{self.group_size}" if self.group_size else "q8 per-row"


@dataclass
class Item:
    """One source tensor and what to write for it."""

    name: str  # canonical source name (for a linear: PREFIX.weight)
    kind: str  # "linear" (decoder linear), "head", "embed", "keep" (tiny / high precision), "drop"
    fmt: str  # q4 / q8 / nf4 / bf16 (linears, head, embed) or the dtype name kept
    group_size: int = 0  # q4: its group size; q8: its group size, 0 for one scale per row
    note: str = ""


def _q4_group(k: int, want: int) -> int | None:
    for g in (128, 64, 32):
        if g <= want and k % g == 0:
            return g
    return None


def plan_tensors(names: list[str], cfg, opts: QuantOptions) -> list[Item]:
    from olmo_local.checkpoint import linear_shapes

    shapes = linear_shapes(cfg)
    tied = cfg.tie_word_embeddings
    head_fmt, embed_fmt = opts.lm_head, effective_embed(opts, tied)
    items = []
    for name in sorted(names, key=_order):
        if name.endswith(".weight") and name[: -len(".weight")] in shapes:
            prefix = name[: -len(".weight")]
            n, k = shapes[prefix]
            if prefix == "lm_head":
                items.append(_linear_item(name, "head", head_fmt, k, opts.group_size, opts.q8_group_size))
            elif prefix.endswith(("linear_attn.a_proj", "linear_attn.b_proj")):
                items.append(Item(name, "keep", "bf16", note="GDN a/b projection (kept high precision)"))
            else:
                items.append(_linear_item(name, "linear", opts.fmt, k, opts.group_size, opts.q8_group_size))
        elif name == "model.embed_tokens.weight":
            items.append(_embed_item(name, embed_fmt, cfg.hidden_size, opts.q8_group_size))
        elif name.startswith("lm_head.") and tied:
            items.append(Item(name, "drop", "", note="tied copy of the embedding"))
        elif name.endswith(("A_log", "dt_bias")):
            items.append(Item(name, "keep", "fp32"))
        else:
            items.append(Item(name, "keep", "bf16"))
    return items


def effective_embed(opts: QuantOptions, tied: bool) -> str:
    """The embedding's format; with tied embeddings the one table serves as the head too and is stored
    in the more precise of --embed and --lm-head (q4 is not a table format: q8)."""
    if not tied:
        return opts.embed
    fmt = max((opts.lm_head, opts.embed), key=lambda f: _PRECISE[f])
    return "q8" if fmt == "q4" else fmt


def _q8_item(name: str, kind: str, k: int, group_size: int, note: str = "") -> Item:
    from olmo_local.quant.formats import q8_group_for

    g = q8_group_for(k, group_size)
    if group_size and g != group_size:
        why = f"in_features {k} is not a multiple of {group_size}: " + \
              (f"q8 group size {g}" if g else "q8 with one scale per row")
        note = f"{note}; {why}" if note else why
    return Item(name, kind, "q8", g, note)


def _embed_item(name: str, fmt: str, dim: int, group_size: int) -> Item:
    if fmt != "q8":
        return Item(name, "embed", fmt)
    it = _q8_item(name, "embed", dim, group_size or 0)
    return Item(name, "embed", "q8", it.group_size, it.note.replace("in_features", "hidden size"))


def _linear_item(name: str, kind: str, fmt: str, k: int, group_size: int, q8_group: int) -> Item:
    # group_size is --group-size (0 only with --format q8: per-row q8; q4 parts then use 128);
    # q8_group is the group size of q8 parts (QuantOptions.q8_group_size)
    if fmt == "q4":
        g = _q4_group(k, group_size or 128)
        if g is None:
            return _q8_item(name, kind, k, q8_group,
                            note=f"in_features {k} is not a multiple of 32: q8 instead of q4")
        want = group_size or 128
        note = "" if g == want else f"in_features {k} is not a multiple of {want}: group size {g}"
        return Item(name, kind, "q4", g, note)
    if fmt == "q8":
        return _q8_item(name, kind, k, q8_group)
    if fmt == "nf4" and k % 64 and name.endswith(_FUSED):
        # bitsandbytes blocks may straddle rows, but then the loader cannot stack q|k|v|g or gate|up
        return _q8_item(name, kind, k, q8_group, note=f"in_features {k} is not a multiple of 64 (nf4 blocks "
                                                         "of a fused projection): q8")
    return Item(name, kind, fmt)


# linears the loader stacks into one module (q|k|v, q|k|v|g, gate|up)
_FUSED = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "g_proj", "gate_proj", "up_proj"))


def _order(name: str) -> tuple:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


# ---- reading the source without mmap -----------------------------------------------------------
class SourceTensors:
    """Reads tensors named by a TensorReader with plain positioned reads into fresh buffers (no mmap:
    the pages of a memory-mapped file would count in this process's resident set)."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self._headers: dict[Path, tuple[int, dict]] = {}

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]

    def nbytes(self, name: str) -> int:
        path, key = self.reader.locate(name)
        start, hdr = self._header(path)
        a, b = hdr[key]["data_offsets"]
        return b - a

    def read(self, name: str) -> torch.Tensor:
        path, key = self.reader.locate(name)
        start, hdr = self._header(path)
        meta = hdr[key]
        a, b = meta["data_offsets"]
        dtype = _FROM_ST.get(meta["dtype"])
        if dtype is None:
            raise OlmoError(f"{name} in {path} has unsupported dtype {meta['dtype']}")
        buf = bytearray(b - a)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + a)
            got = 0
            while got < len(buf):
                r = f.readinto(view[got:])
                if not r:
                    raise OlmoError(f"{path} is truncated (reading {name}); re-download the model")
                got += r
        if not buf:
            return torch.empty(meta["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(meta["shape"])


# ---- writing shards in a stream ----------------------------------------------------------------
class ShardWriter:
    """Appends tensors one at a time; each shard is assembled (header first) from per-element-size spill
    files once it is full, so only the tensor being written is ever in memory. Tensors inside a shard
    are ordered by element size (8, 4, 2, 1 bytes) so every tensor is aligned, as safetensors does."""

    def __init__(self, dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> None:
        self.dst = dst
        self.max = max_shard_bytes
        self.shards: list[tuple[str, list[str]]] = []  # (file name, tensor names)
        self.total = 0
        self._open_shard()

    def _open_shard(self) -> None:
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {8: [], 4: [], 2: [], 1: []}
        self._spill = {}
        self._size = 0

    def _spill_file(self, es: int):
        if es not in self._spill:
            self._spill[es] = open(self.dst / f".spill-{len(self.shards)}-{es}", "wb")
        return self._spill[es]

    def add(self, name: str, t: torch.Tensor) -> int:
        t = t.detach().contiguous().cpu()
        nb = t.numel() * t.element_size()
        if self._size and self._size + nb > self.max:
            self._close_shard()
        es = t.element_size()
        f = self._spill_file(es)
        if nb:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[es].append((name, _ST_DTYPES[t.dtype], list(t.shape), nb))
        self._size += nb
        self.total += nb
        return nb

    def _close_shard(self) -> None:
        fname = f".shard-{len(self.shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        names = []
        for es in (8, 4, 2, 1):
            for name, dt, shape, nb in self._entries[es]:
                header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
                off += nb
                names.append(name)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        for f in self._spill.values():
            f.close()
        with open(self.dst / fname, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for es in (8, 4, 2, 1):
                if es in self._spill:
                    p = Path(self._spill[es].name)
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
                    p.unlink()
        self.shards.append((fname, names))
        self._open_shard()

    def close(self) -> list[str]:
        """Finish: model.safetensors, or model-0000i-of-0000n.safetensors + index. Returns the files."""
        if self._size or not self.shards:
            self._close_shard()
        n = len(self.shards)
        if n == 1:
            os.replace(self.dst / self.shards[0][0], self.dst / "model.safetensors")
            return ["model.safetensors"]
        files, weight_map = [], {}
        for i, (tmp, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dst / tmp, self.dst / final)
            files.append(final)
            weight_map.update({k: final for k in names})
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")
        return files + ["model.safetensors.index.json"]


# ---- quantizing one checkpoint -----------------------------------------------------------------
@dataclass
class Tally:
    """Bytes written and weights covered, per kind (linear / head / embed / keep)."""

    bytes_out: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)  # "q4 g128" -> count of linears

    def add(self, kind: str, nbytes: int, params: int) -> None:
        self.bytes_out[kind] = self.bytes_out.get(kind, 0) + nbytes
        self.params[kind] = self.params.get(kind, 0) + params

    def bpw(self, *kinds: str) -> float:
        ks = kinds or tuple(self.params)
        p = sum(self.params.get(k, 0) for k in ks)
        return 8.0 * sum(self.bytes_out.get(k, 0) for k in ks) / p if p else float("nan")

    @property
    def bpw_linear(self) -> float:
        """All decoder linears (quantized ones and the GDN a/b kept in bf16), lm_head excluded."""
        return self.bpw("linear", "ab")


def item_format(it: Item) -> str:
    """How one planned tensor is stored, for the report and the progress lines ("q4 g128", "q8 g64",
    "q8 per-row", "nf4", "bf16", ...)."""
    if it.fmt == "q4":
        return f"q4 g{it.group_size}"
    if it.fmt == "q8":
        return f"q8 g{it.group_size}" if it.group_size else "q8 per-row"
    return it.fmt


def _keep_dtype(fmt: str, t: torch.Tensor) -> torch.dtype:
    if fmt == "fp32":
        return torch.float32
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def quantize_tensors(src: SourceTensors, items: list[Item], opts: QuantOptions, writer: ShardWriter,
                     progress: Callable[[Item, int, int, int], None] | None = None,
                     device: torch.device | str = "cpu") -> Tally:
    """Stream every planned tensor from ``src`` through its quantizer (on ``device``) into ``writer``."""
    from olmo_local.quant.checkpoint import quantize_linear_tensors
    from olmo_local.quant.formats import quantize_q8

    tally = Tally()
    for i, it in enumerate(items):
        if it.kind == "drop":
            continue
        t = src.read(it.name)
        if not t.is_floating_point():
            raise OlmoError(f"{it.name} is stored as {t.dtype}: the source is already quantized")
        nin, numel = t.numel() * t.element_size(), t.numel()
        if it.kind in ("linear", "head") and it.fmt != "bf16":
            out = quantize_linear_tensors(it.name[: -len(".weight")], t.to(device), it.fmt,
                                          it.group_size if it.fmt in ("q4", "q8") else opts.group_size,
                                          double_quant=opts.double_quant and it.fmt == "nf4")
            label = item_format(it)
            tally.formats[label] = tally.formats.get(label, 0) + 1
        elif it.kind == "embed" and it.fmt == "q8":
            d = quantize_q8(t.to(device), group_size=it.group_size)
            out = {"model.embed_tokens.qweight": d["qweight"], "model.embed_tokens.scales": d["scales"]}
            del d
        else:
            out = {it.name: t.to(_keep_dtype(it.fmt, t))}
        del t  # the source tensor's buffer goes before the next one is read
        nout = sum(writer.add(k, v) for k, v in out.items())
        del out
        tally.bytes_in += nin
        tally.add("ab" if it.note.startswith("GDN a/b") else it.kind, nout, numel)
        if it.note:
            tally.notes[it.name] = it.note
        if progress:
            progress(it, i, nin, nout)
    return tally


def quantization_config(opts: QuantOptions, tally: Tally, tied: bool) -> dict:
    extra = {"format": opts.fmt, "lm_head": "tied" if tied else opts.lm_head,
             "embed": effective_embed(opts, tied),
             "bits_per_weight": round(tally.bpw_linear, 4), "bits_per_weight_overall": round(tally.bpw(), 4),
             "quantized_by": "olmo-local"}
    if tally.notes:
        extra["exceptions"] = {k: v for k, v in tally.notes.items() if not v.startswith("GDN a/b")}
    if opts.fmt == "nf4":
        skip = ["lm_head", "a_proj", "b_proj"]
        return {"quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True,
                "llm_int8_threshold": 6.0, "llm_int8_skip_modules": skip,
                "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": opts.double_quant,
                "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                "load_in_4bit": True, "load_in_8bit": False, "group_size": 64, **extra}
    if opts.fmt in ("q4", "q8"):
        return {"quant_method": "olmo-local", "format": opts.fmt, "group_size": opts.group_size, **extra}
    return {"quant_method": "olmo-local", **extra}


def check_source(reader, cfg, raw_cfg: dict) -> None:
    from olmo_local.checkpoint import validate

    q = raw_cfg.get("quantization_config")
    if q:
        what = q.get("format") or q.get("quant_method") or "quantized"
        raise OlmoError(f"{reader.path} is already quantized ({what}); quantize an unquantized "
                        "(bf16/fp16/fp32) checkpoint")
    for n in reader.names():
        if n.endswith((".qweight", ".absmax", ".SCB")):
            raise OlmoError(f"{reader.path} holds quantized tensors ({n}); "
                            "quantize an unquantized checkpoint")

    def names_of(prefix: str) -> list[str]:
        return [prefix + ".weight"]

    validate(reader, cfg, names_of)


def write_quantized(src_path: Path, out: Path, opts: QuantOptions, progress=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD, copy_files: bool = True,
                    device: torch.device | str = "cpu") -> tuple[Tally, list[str]]:
    """Quantize the checkpoint at ``src_path`` into the (existing, empty) directory ``out``."""
    from olmo_local.checkpoint import TensorReader, read_config

    cfg = read_config(src_path)
    raw_cfg = json.loads((src_path / "config.json").read_text(encoding="utf-8"))
    reader = TensorReader(src_path)
    check_source(reader, cfg, raw_cfg)
    items = plan_tensors(reader.names(), cfg, opts)
    src = SourceTensors(reader)
    writer = ShardWriter(out, max_shard_bytes)
    try:
        tally = quantize_tensors(src, items, opts, writer, progress, device)
        files = writer.close()
    finally:
        for f in getattr(writer, "_spill", {}).values():
            f.close()
    raw_cfg["quantization_config"] = quantization_config(opts, tally, cfg.tie_word_embeddings)
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")
    if copy_files:
        for fname in COPY_FILES:
            if (src_path / fname).is_file():
                shutil.copyfile(src_path / fname, out / fname)
        for pat in COPY_GLOBS:
            for f in src_path.glob(pat):
                if f.is_file():
                    shutil.copyfile(f, out / f.name)
    return tally, files


def source_items(src_path: Path, opts: QuantOptions) -> tuple[list[Item], int]:
    """The plan and the total source bytes it reads (for the progress bar)."""
    from olmo_local.checkpoint import TensorReader, read_config

    reader = TensorReader(src_path)
    items = plan_tensors(reader.names(), read_config(src_path), opts)
    src = SourceTensors(reader)
    return items, sum(src.nbytes(it.name) for it in items if it.kind != "drop")


# ---- progress ----------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Progress:
    """A rich progress bar (tensor name, bytes in -> out) on a terminal; plain lines otherwise."""

    def __init__(self, total_bytes: int, n_items: int, title: str, plain: bool | None = None) -> None:
        self.total, self.n, self.title = total_bytes, n_items, title
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.done_in = self.done_out = 0
        self.count = 0
        self._bar = None

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            console.print(f"[bold]{self.title}[/]: {self.n} tensors, {_mb(self.total)}", highlight=False)
            self._bar = RichProgress(BarColumn(bar_width=24), TextColumn("{task.percentage:>3.0f}%"),
                                     TimeElapsedColumn(), TextColumn("{task.fields[io]}"),
                                     TextColumn("{task.description}"), console=console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=max(1, self.total), title=self.title, io="")
        else:
            print(f"{self.title}: {self.n} tensors, {_mb(self.total)}", file=sys.stderr, flush=True)
        return self

    def __call__(self, it: Item, i: int, nin: int, nout: int) -> None:
        self.done_in += nin
        self.done_out += nout
        self.count += 1
        fmt = item_format(it)
        if self._bar is not None:
            desc = f"{it.name} ({fmt})"
            room = max(16, self._bar.console.width - 66)  # keep bar and times at full width
            desc = desc if len(desc) <= room else "…" + desc[-(room - 1):]
            self._bar.update(self._task, advance=nin, description=desc,
                             io=f"{_mb(self.done_in)} -> {_mb(self.done_out)}")
        else:
            print(f"[{self.count}/{self.n}] {it.name} {fmt}: {_mb(nin)} -> {_mb(nout)}", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@dataclass
class ReportRow:
    label: str
    bpw_linear: float
    bpw_overall: float
    size_bytes: int
    stats: object = None  # eval.TextStats

    def to_dict(self) -> dict:
        d = {"model": self.label, "bits_per_weight_linear": round(self.bpw_linear, 4),
             "bits_per_weight_overall": round(self.bpw_overall, 4), "size_bytes": self.size_bytes}
        if self.stats is not None:
            d.update(self.stats.to_dict())
        return d


def source_bpw(src_path: Path, cfg) -> tuple[float, float]:
    """(bits per weight of the decoder linears, overall) of an unquantized checkpoint."""
    from olmo_local.checkpoint import TensorReader, linear_shapes

    reader = TensorReader(src_path)
    lin_b = lin_p = all_b = all_p = 0
    shapes = linear_shapes(cfg)
    for n in reader.names():
        if n.startswith("lm_head.") and cfg.tie_word_embeddings:
            continue
        p = math.prod(reader.shape(n))
        dt = reader.dtype(n) or torch.uint8
        b = p * torch.tensor([], dtype=dt).element_size()
        all_b, all_p = all_b + b, all_p + p
        if n.endswith(".weight") and n[:-7] in shapes and n[:-7] != "lm_head":
            lin_b, lin_p = lin_b + b, lin_p + p
    return 8.0 * lin_b / max(1, lin_p), 8.0 * all_b / max(1, all_p)


def quality_report(src_path: Path, tmp: Path, opts: QuantOptions, tally: Tally, text: Path | None,
                   tokens: int, window: int, baseline: str | None, device: str | None) -> dict:
    """Evaluate SRC (reference, fp32 compute), the new checkpoint in ``tmp`` and optionally a bitsandbytes
    NF4 baseline on the same windows of held-out text."""
    from olmo_local import eval as ev
    from olmo_local.checkpoint import load_model, read_config
    from olmo_local.runtime import pick_device
    from olmo_local.tokenizer import Tokenizer

    dev = pick_device(device)
    cfg = read_config(src_path)
    text_path, body = ev.read_text(text)
    tok = Tokenizer.from_dir(src_path)
    windows = ev.tokenize_windows(tok, body, tokens, window)
    n_valid = ev.n_valid_ids(tok, cfg)
    status = ev._status()
    work = tmp / ".eval"
    work.mkdir()
    rows: list[ReportRow] = []
    try:
        ref_model = load_model(src_path, dev, ev.eval_dtype(src_path, dev))
        compute = str(ref_model.dtype).replace("torch.", "")
        ref = ev.Reference.build(ref_model, windows, n_valid, work, status("reference (source)"))
        del ref_model
        gc.collect()
        lin_bpw, all_bpw = source_bpw(src_path, cfg)
        rows.append(ReportRow(f"source ({_src_dtype(src_path)})", lin_bpw, all_bpw, _dir_bytes(src_path),
                              ref.stats))

        def run(label: str, path: Path, t: Tally) -> None:
            m = load_model(path, dev, ev.eval_dtype(src_path, dev))
            st = ev.evaluate(m, windows, n_valid, ref, status(label))
            del m
            gc.collect()
            rows.append(ReportRow(label, t.bpw_linear, t.bpw(), _dir_bytes(path), st))

        run(opts.label, tmp, tally)
        if baseline:
            bopts = QuantOptions("nf4", lm_head=opts.lm_head, embed=opts.embed)
            bdir = work / "baseline-nf4"
            bdir.mkdir()
            items, total = source_items(src_path, bopts)
            with Progress(total, len([i for i in items if i.kind != "drop"]), "nf4 baseline") as prog:
                btally, _ = write_quantized(src_path, bdir, bopts, prog, copy_files=False, device=dev)
            run("nf4 (bitsandbytes baseline)", bdir, btally)
            shutil.rmtree(bdir)
        ref.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n, w = windows.shape
    return {"text": str(text_path), "windows": n, "window": w, "scored_tokens": n * (w - 1),
            "device": str(dev), "compute_dtype": compute,
            "method": ev.METHOD.format(window=w, scored=w - 1),
            "baseline": None if not baseline else
            "bitsandbytes quantize_4bit nf4, blocksize 64, no double quant, on the same decoder linears; "
            "lm_head / embedding / small tensors as in the quantized row, so the rows differ only in the "
            "linear weights' format",
            "rows": [r.to_dict() for r in rows]}


def _src_dtype(path: Path) -> str:
    from olmo_local.checkpoint import TensorReader

    r = TensorReader(path)
    counts: dict[str, int] = {}
    for n in r.names():
        d = str(r.dtype(n)).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16") \
            .replace("float32", "fp32")
        counts[d] = counts.get(d, 0) + math.prod(r.shape(n))
    return max(counts, key=counts.get) if counts else "?"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = report.get("eval")
    console = Console(width=max(120, Console().width))
    t = Table(title=(f"quality on {ev['scored_tokens']} tokens of {Path(ev['text']).name} "
                     f"({ev['windows']} windows x {ev['window']}, {ev['device']} {ev['compute_dtype']})")
              if ev else "sizes")
    cols = ["model", "bits/w linear", "bits/w all", "size"]
    if ev:
        cols += ["perplexity", "KLD mean", "KLD p99", "same top %"]
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in (ev["rows"] if ev else report["rows"]):
        cells = [r["model"], f"{r['bits_per_weight_linear']:.3f}", f"{r['bits_per_weight_overall']:.3f}",
                 _mb(r["size_bytes"])]
        if ev:
            cells += [f"{r['ppl']:.4f}",
                      "-" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}",
                      "-" if r.get("kld_p99") is None else f"{r['kld_p99']:.5f}",
                      "-" if r.get("same_top_pct") is None else f"{r['same_top_pct']:.2f}"]
        t.add_row(*cells)
    console.print(t)


# ---- the command -------------------------------------------------------------------------------
def _parse_size(s: str) -> int:
    m = {"k": 2**10, "m": 2**20, "g": 2**30}
    s2 = s.strip().lower().rstrip("ib").rstrip("b")
    try:
        if s2 and s2[-1] in m:
            return int(float(s2[:-1]) * m[s2[-1]])
        return int(s2)
    except ValueError:
        raise OlmoError(f"--max-shard-size: cannot read {s!r} (e.g. 4GB, 500MB)") from None


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception so every cleanup runs
    raise _Terminated()


from olmo_local.cli import app  # noqa: E402  (registers the command on the shared Typer app)

import typer  # noqa: E402


@app.command()
def quantize(
    src: str = typer.Argument(..., help="unquantized checkpoint: directory, Hugging Face repo id or 'demo'"),
    dst: Path = typer.Argument(..., help="directory to create"),
    fmt: str = typer.Option(..., "--format", "-f", help="q4, q8 or nf4 (bitsandbytes)"),
    group_size: int = typer.Option(128, "--group-size", "-g",
                                   help="inputs per scale: 32, 64 or 128 (q4, q8); q8 also 0: one per row"),
    lm_head: Optional[str] = typer.Option(None, "--lm-head", help="q8 (default), q4, bf16 (default for nf4)"),
    embed: Optional[str] = typer.Option(None, "--embed", help="q8 (default) or bf16 (default for nf4)"),
    double_quant: bool = typer.Option(False, "--double-quant", help="nf4: quantize the block scales too"),
    text: Optional[Path] = typer.Option(None, "--text", help="held-out text for the report "
                                                               "(default: the bundled one)"),
    tokens: int = typer.Option(8192, "--tokens", help="tokens of the text the report evaluates"),
    window: int = typer.Option(512, "--window", help="tokens per evaluation window (fresh state each)"),
    baseline: Optional[str] = typer.Option(None, "--baseline",
                                           help="nf4: add bitsandbytes NF4 (blocksize 64) as a report row"),
    force: bool = typer.Option(False, "--force", help="replace DST if it exists"),
    no_report: bool = typer.Option(False, "--no-report", help="skip the quality evaluation"),
    device: Optional[str] = typer.Option(None, help="device for quantizing and for the quality evaluation "
                                                    "(default: cuda if available)"),
    max_shard_size: str = typer.Option("4GB", "--max-shard-size", help="split the weights above this size"),
) -> None:
    """Quantize a checkpoint to q4 / q8 / nf4 and report its quality against the original."""
    from olmo_local.checkpoint import AtomicDir, read_config, resolve_model
    from olmo_local.runtime import pick_device

    dev = pick_device(device)
    opts = QuantOptions(fmt, group_size, lm_head, embed, double_quant)
    if baseline not in (None, "nf4"):
        raise OlmoError(f"--baseline {baseline!r}: only nf4 is available")
    max_shard = _parse_size(max_shard_size)
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise OlmoError(f"{dst} already exists (use --force to overwrite)")
    src_path = resolve_model(src)
    if dst.resolve() == src_path.resolve():
        raise OlmoError("DST is the source directory; choose another directory")
    cfg = read_config(src_path)
    if not no_report:
        from olmo_local import eval as ev
        from olmo_local.tokenizer import Tokenizer

        ev.read_text(text)
        Tokenizer.from_dir(src_path)  # the report needs the tokenizer: fail before any work
    items, total = source_items(src_path, opts)
    n_items = len([i for i in items if i.kind != "drop"])
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    try:
        with AtomicDir(dst, force=force) as tmp:
            with Progress(total, n_items, f"{src} -> {opts.label}") as prog:
                tally, files = write_quantized(src_path, tmp, opts, prog, max_shard, device=dev)
            report = base_report(src_path, tmp, cfg, opts, tally, files)
            report["quantize_seconds"] = round(time.perf_counter() - t0, 2)
            report["peak_rss_mb"] = {"quantize": round(_rss_mb(), 1), "at_start": round(rss0, 1)}
            if not no_report:
                report["eval"] = quality_report(src_path, tmp, opts, tally, text, tokens, window, baseline,
                                                device)
                report["peak_rss_mb"]["with_eval"] = round(_rss_mb(), 1)
            (tmp / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
            print_report(report)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: AtomicDir has already removed the temporary directory
        print(f"interrupted: nothing was written to {dst}", file=sys.stderr, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    print(f"wrote {dst} ({opts.label}, {_mb(report['size_bytes']['quantized'])}, "
          f"{report['bits_per_weight']['linear']:.3f} bits/weight in the linears) in "
          f"{report['quantize_seconds']:.1f} s; peak RSS while quantizing "
          f"{report['peak_rss_mb']['quantize']:.0f} MB", file=sys.stderr)


def base_report(src_path: Path, out: Path, cfg, opts: QuantOptions, tally: Tally, files: list[str]) -> dict:
    """quant_report.json without the evaluation: what was written, sizes, bits per weight."""
    sizes = {"source": _dir_bytes(src_path), "quantized": _dir_bytes(out)}
    lin, allb = source_bpw(src_path, cfg)
    return {
        "source": str(src_path), "format": opts.fmt,
        "group_size": {"q4": opts.group_size, "q8": opts.group_size, "nf4": 64}.get(opts.fmt),
        "lm_head": "tied" if cfg.tie_word_embeddings else opts.lm_head,
        "embed": effective_embed(opts, cfg.tie_word_embeddings),
        "double_quant": opts.double_quant, "files": files, "linear_formats": tally.formats,
        "exceptions": {k: v for k, v in tally.notes.items() if not v.startswith("GDN a/b")},
        "size_bytes": sizes,
        "bits_per_weight": {"linear": round(tally.bpw_linear, 4), "overall": round(tally.bpw(), 4),
                            "lm_head": round(tally.bpw("head"), 4) if "head" in tally.params else None,
                            "embed": round(tally.bpw("embed"), 4)},
        "rows": [ReportRow(f"source ({_src_dtype(src_path)})", lin, allb, sizes["source"]).to_dict(),
                 ReportRow(opts.label, tally.bpw_linear, tally.bpw(), sizes["quantized"]).to_dict()],
        "eval": None,
    }
