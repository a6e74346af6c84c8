"""Held-out text evaluation: perplexity, and KL divergence / top-1 agreement against a reference model.

One method, shared by ``olmo-local eval`` and the quality report of ``olmo-local quantize``:

- The text is tokenized as plain text (no BOS, no chat template) and cut into windows of ``window``
  tokens (512 by default). ``tokens // window`` windows are placed evenly over the whole token stream
  (so every part of a multi-source text is sampled), non-overlapping; a text with fewer tokens gives all
  of its non-overlapping windows.
- Each window is an independent causal forward from a fresh state (nothing carried between windows).
  Every next-token prediction inside a window is scored: ``window - 1`` per window.
- Log-probabilities are computed in fp32 over the ids the tokenizer can produce (embedding rows past
  the tokenizer's vocabulary are padding, masked out exactly as the sampler masks them).
- perplexity = exp(mean negative log-likelihood of the actual next token).
- KLD = KL(ref || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)) per scored token, in nats;
  reported as the mean and the 99th percentile over tokens. same-top = % of scored tokens where both
  models' most likely next token is the same.
- The reference's log-probabilities are computed first and kept (in RAM when small, else in a file
  in a temporary directory), so only one model is in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from olmo_local.errors import OlmoError

DEFAULT_TEXT = Path(__file__).parent / "assets" / "eval" / "heldout.txt"
DEFAULT_WINDOW = 512
DEFAULT_TOKENS = 8192
_RAM_CACHE_BYTES = 1 << 30  # reference log-probs up to this size stay in RAM, larger go to a file

METHOD = ("windows of {window} tokens spread evenly over the text, fresh state per window, "
          "{scored} next-token predictions per window scored; fp32 log-probs over the tokenizer's ids; "
          "KLD = KL(reference || model) in nats")


# ---- text -> windows ---------------------------------------------------------------------------
def read_text(path: str | os.PathLike | None) -> tuple[Path, str]:
    p = Path(path).expanduser() if path else DEFAULT_TEXT
    if not p.is_file():
        if path is None:
            raise OlmoError(f"the held-out evaluation text is missing from this installation ({p}); "
                            "give one with --text FILE")
        raise OlmoError(f"no such text file: {p}")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OlmoError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def make_windows(ids: list[int], tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """[n, window] int64: ``tokens // window`` windows spread evenly over ``ids`` (non-overlapping)."""
    if window < 2:
        raise OlmoError(f"--window must be at least 2 tokens, got {window}")
    if tokens < 2:
        raise OlmoError(f"--tokens must be at least 2, got {tokens}")
    if len(ids) < 2:
        raise OlmoError("the evaluation text is too short (fewer than 2 tokens)")
    window = min(window, len(ids), tokens)
    avail = len(ids) // window
    n = max(1, min(tokens // window, avail))
    if n == 1:
        starts = [0]
    else:  # evenly spaced starts; the last window ends at the end of the text
        span = len(ids) - window
        starts = [round(i * span / (n - 1)) for i in range(n)]
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s: s + window] for s in starts])


def tokenize_windows(tokenizer, text: str, tokens: int = DEFAULT_TOKENS,
                     window: int = DEFAULT_WINDOW) -> torch.Tensor:
    return make_windows(tokenizer.encode(text), tokens, window)


# ---- logits ------------------------------------------------------------------------------------
@torch.inference_mode()
def iter_logprobs(model, windows: torch.Tensor, n_valid: int | None = None) -> Iterator[torch.Tensor]:
    """Per window: fp32 log-probabilities [window - 1, n_valid] of the next token at every position
    but the last (a fresh causal forward per window)."""
    dev = model.device
    for w in windows:
        logits = model(w[None].to(dev))[0, :-1]
        if n_valid is not None:
            logits = logits[:, :n_valid]
        yield torch.log_softmax(logits.float(), dim=-1).cpu()


def _target_nll(lp: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return -lp.gather(1, window[1:, None].to(lp.device)).squeeze(1).double()


@dataclass
class TextStats:
    """What one model scored on the windows (KLD fields only against a reference)."""

    tokens: int  # scored predictions
    nll: float  # mean negative log-likelihood (nats / token)
    ppl: float
    kld_mean: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    same_top_pct: float | None = None

    def to_dict(self) -> dict:
        return {k: (None if v is None else (round(v, 8) if isinstance(v, float) else v))
                for k, v in asdict(self).items()}


def _ppl(nll_sum: float, n: int) -> float:
    mean = nll_sum / n
    return math.exp(mean) if mean < 700 else float("inf")


class Reference:
    """The reference model's log-probs on a set of windows, kept so that other models can be compared
    against it later without both being in memory. Use as a context manager (removes its file)."""

    def __init__(self, windows: torch.Tensor, n_valid: int, workdir: str | Path | None = None) -> None:
        self.windows = windows
        self.n_valid = n_valid
        n, w = windows.shape
        nbytes = n * (w - 1) * n_valid * 4
        self._file: Path | None = None
        if nbytes <= _RAM_CACHE_BYTES:
            self.logprobs = torch.empty(n, w - 1, n_valid, dtype=torch.float32)
        else:
            fd, name = tempfile.mkstemp(prefix="ref-logprobs-", suffix=".f32", dir=workdir)
            os.close(fd)
            self._file = Path(name)
            self.logprobs = torch.from_file(name, shared=True, size=n * (w - 1) * n_valid,
                                            dtype=torch.float32).view(n, w - 1, n_valid)
        self.stats: TextStats | None = None

    @classmethod
    def build(cls, model, windows: torch.Tensor, n_valid: int, workdir: str | Path | None = None,
              progress: Callable[[int, int], None] | None = None) -> Reference:
        ref = cls(windows, n_valid, workdir)
        try:
            nll, n = 0.0, 0
            for i, lp in enumerate(iter_logprobs(model, windows, n_valid)):
                ref.logprobs[i].copy_(lp)
                t = _target_nll(lp, windows[i])
                nll += float(t.sum())
                n += t.numel()
                if progress:
                    progress(i + 1, len(windows))
            ref.stats = TextStats(tokens=n, nll=nll / n, ppl=_ppl(nll, n))
        except BaseException:
            ref.close()
            raise
        return ref

    def close(self) -> None:
        self.logprobs = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kl_and_top(ref_lp: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(ref || model) in nats and whether the argmaxes agree (fp32 log-probs; torch's
    pairwise summation keeps the row sums accurate to ~1e-7 relative)."""
    kld = (ref_lp.exp() * (ref_lp - lp)).sum(-1).double().clamp_min(0.0)
    same = ref_lp.argmax(-1) == lp.argmax(-1)
    return kld, same


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, n_valid: int | None = None, reference: Reference | None = None,
             progress: Callable[[int, int], None] | None = None) -> TextStats:
    """Perplexity of ``model`` on ``windows``; with ``reference`` also KLD and same-top against it."""
    if reference is not None:
        if n_valid is not None and n_valid != reference.n_valid:
            raise OlmoError(f"the model has {n_valid} token ids, the reference {reference.n_valid}: "
                            "compare models that share a tokenizer")
        n_valid = reference.n_valid
        if not torch.equal(windows, reference.windows):
            raise ValueError("evaluate(): windows differ from the reference's")
    nll, n = 0.0, 0
    klds, same = [], 0
    for i, lp in enumerate(iter_logprobs(model, windows, n_valid)):
        t = _target_nll(lp, windows[i])
        nll += float(t.sum())
        n += t.numel()
        if reference is not None:
            k, s = kl_and_top(reference.logprobs[i], lp)
            klds.append(k)
            same += int(s.sum())
        if progress:
            progress(i + 1, len(windows))
    st = TextStats(tokens=n, nll=nll / n, ppl=_ppl(nll, n))
    if reference is not None:
        k = torch.cat(klds)
        st.kld_mean = float(k.mean())
        st.kld_p99 = float(torch.quantile(k, 0.99)) if k.numel() <= 16_000_000 else float(
            k.sort().values[min(k.numel() - 1, math.ceil(0.99 * k.numel()) - 1)])
        st.kld_max = float(k.max())
        st.same_top_pct = 100.0 * same / n
    return st


# ---- loading models for evaluation -------------------------------------------------------------
def eval_dtype(path: Path, device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp32 compute unless asked otherwise, or unless the fp32 model would not fit (then bf16)."""
    from olmo_local.checkpoint import TensorReader
    from olmo_local.runtime import parse_dtype

    dt = parse_dtype(requested)
    if dt is not None:
        return dt
    reader = TensorReader(path)
    need = 0
    for name in reader.names():
        n = math.prod(reader.shape(name))
        d = reader.dtype(name)
        need += n * 4 if d is not None and d.is_floating_point else n
    if device.type == "cuda":
        avail = torch.cuda.get_device_properties(device).total_memory
    else:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return torch.float32 if need < 0.6 * avail else torch.bfloat16


def load_for_eval(name: str | os.PathLike, device: torch.device, dtype: str | None = None):
    """(path, config, model) for evaluation: model loaded with its own weight formats."""
    from olmo_local.checkpoint import load_model, read_config, resolve_model

    path = resolve_model(name)
    cfg = read_config(path)
    model = load_model(path, device, eval_dtype(path, device, dtype))
    return path, cfg, model


def n_valid_ids(tokenizer, cfg) -> int:
    return min(tokenizer.vocab_size, cfg.vocab_size)


# ---- output -----------------------------------------------------------------------------------
def _status() -> Callable[[str], Callable[[int, int], None] | None]:
    """Per model, a progress callback printing 'name: i/n windows' on stderr (one updating line on a
    terminal, a line per quarter otherwise)."""
    import sys

    tty = sys.stderr.isatty()

    def make(label: str) -> Callable[[int, int], None]:
        def cb(i: int, n: int) -> None:
            if tty:
                end = "\n" if i == n else ""
                print(f"\r{label}: window {i}/{n}", end=end, file=sys.stderr, flush=True)
            elif i == n or i % max(1, n // 4) == 0:
                print(f"{label}: window {i}/{n}", file=sys.stderr, flush=True)
        return cb

    return make


def format_rows(rows: list[tuple[str, TextStats]]) -> list[list[str]]:
    out = []
    for name, s in rows:
        out.append([name, f"{s.ppl:.4f}",
                    "-" if s.kld_mean is None else f"{s.kld_mean:.5f}",
                    "-" if s.kld_p99 is None else f"{s.kld_p99:.5f}",
                    "-" if s.same_top_pct is None else f"{s.same_top_pct:.2f}"])
    return out


def print_table(rows: list[tuple[str, TextStats]], info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{info['scored_tokens']} tokens of {Path(info['text']).name} "
                    f"({info['windows']} windows x {info['window']})")
    for col in ("model", "perplexity", "KLD mean", "KLD p99", "same top %"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in format_rows(rows):
        t.add_row(*r)
    Console(width=max(100, Console().width)).print(t)


# ---- the command -------------------------------------------------------------------------------
from olmo_local.cli import app  # noqa: E402  (registers the command on the shared Typer app)

import typer  # noqa: E402


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model directory, Hugging Face repo id, or 'demo'"),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text (default: bundled held-out text)"),
    reference: Optional[str] = typer.Option(None, "--reference", "-r",
                                            help="a second model (e.g. the unquantized one): KLD, same-top"),
    tokens: int = typer.Option(DEFAULT_TOKENS, help="tokens to evaluate (in windows spread over the text)"),
    window: int = typer.Option(DEFAULT_WINDOW, help="tokens per window (fresh state each)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    dtype: Optional[str] = typer.Option(None, help="compute dtype: fp32 (default), bf16 or fp16"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results to this JSON file"),
) -> None:
    """Perplexity on held-out text; with --reference also KL divergence and same-top-token agreement."""
    from olmo_local.checkpoint import resolve_model
    from olmo_local.runtime import pick_device
    from olmo_local.tokenizer import Tokenizer

    dev = pick_device(device)
    text_path, body = read_text(text)
    path = resolve_model(model)
    tok = Tokenizer.from_dir(path)
    windows = tokenize_windows(tok, body, tokens, window)
    status = _status()
    rows: list[tuple[str, TextStats]] = []
    with tempfile.TemporaryDirectory(prefix="olmo-local-eval-") as td:
        ref = None
        try:
            if reference is not None:
                rpath, rcfg, rmodel = load_for_eval(reference, dev, dtype)
                ref = Reference.build(rmodel, windows, n_valid_ids(tok, rcfg), td,
                                      status(f"reference {rpath}"))
                del rmodel
                rows.append((f"{reference} (reference)", ref.stats))
            _, cfg, m = load_for_eval(path, dev, dtype)
            if ref is not None and cfg.vocab_size != rcfg.vocab_size:
                raise OlmoError(f"{model} has {cfg.vocab_size} embedding rows, the reference "
                                f"{rcfg.vocab_size}: compare models that share a tokenizer")
            rows.append((model, evaluate(m, windows, n_valid_ids(tok, cfg), ref, status(str(model)))))
        finally:
            if ref is not None:
                ref.close()
    n, w = windows.shape
    info = {"text": str(text_path), "windows": n, "window": w, "scored_tokens": n * (w - 1),
            "device": str(dev), "method": METHOD.format(window=w, scored=w - 1)}
    print_table(rows, info)
    if json_out:
        json_out.write_text(json.dumps({**info, "rows": [{"model": k, **s.to_dict()} for k, s in rows]},
                                       indent=2) + "\n")
