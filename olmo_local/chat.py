"""``olmo-local chat [MODEL]``: a terminal chat over one loaded model.

In a terminal: rich rendering and prompt_toolkit input (olmo_local.chat_view / chat_input). When stdin
is not a terminal, one message per line (or all of stdin with ``--once``) and plain replies on stdout,
so scripts can drive it. The conversation logic lives in olmo_local.chat_session.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from olmo_local.cli import app
from olmo_local.errors import OlmoError

DEFAULT_MODEL = "allenai/Olmo-Hybrid-Instruct-DPO-7B"
KV_CACHE_KINDS = ("auto", "bf16", "int8")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olmo-local" / "models"


def default_model_cache() -> Path:
    return _cache_root() / (DEFAULT_MODEL.replace("/", "--") + "-q4")


def stored_format(path: Path) -> str:
    import json
    try:
        q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return "bf16"
    if not q:
        return "bf16"
    return "nf4" if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit") else str(q.get("format", "?"))


def quantized_copy(path: Path, fmt: str, cache: Path, say=lambda msg: None, label: str | None = None) -> Path:
    """A ``fmt`` copy of the unquantized checkpoint at ``path``, made once into ``cache`` (atomically)
    and reused after that."""
    from olmo_local.checkpoint import AtomicDir
    from olmo_local.quantize_cmd import QuantOptions, write_quantized

    if (cache / "config.json").is_file():
        return cache
    say(f"first use of {label or path} as {fmt}: quantizing it once (cached in {cache})")
    with AtomicDir(cache, force=True) as tmp:
        write_quantized(Path(path), tmp, QuantOptions(fmt))
    return cache


def prepare_default_model(path: Path, say=lambda msg: None) -> Path:
    """Quantize-on-first-use (as Ollama does): the default model's bf16 checkpoint is turned into a q4
    copy once, cached in $XDG_CACHE_HOME/olmo-local/models/, and that copy is what chat loads from then
    on. A checkpoint that is already quantized is used as it is."""
    if stored_format(path) != "bf16":
        return Path(path)
    return quantized_copy(path, "q4", default_model_cache(), say, DEFAULT_MODEL)


def apply_format(name: str, fmt: str | None, say=lambda msg: None) -> str:
    """``--format``: load MODEL in that weight format, quantizing an unquantized checkpoint once into the
    cache; a checkpoint already stored in another quantized format is an error."""
    import hashlib

    from olmo_local.checkpoint import resolve_model

    if fmt in (None, "", "auto"):
        return name
    if fmt not in ("bf16", "q8", "q4", "nf4"):
        raise OlmoError(f"unknown --format {fmt!r} (use bf16, q8, q4 or nf4)")
    path = resolve_model(name)
    have = stored_format(path)
    if have == fmt:
        return str(path)
    if have != "bf16":
        raise OlmoError(f"{name} is stored as {have}; --format {fmt} converts only unquantized checkpoints "
                        f"(quantize the original with olmo-local quantize)")
    if fmt == "bf16":
        return str(path)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return str(quantized_copy(path, fmt, _cache_root() / f"{path.name}-{key}-{fmt}", say, name))


def resolve_chat_model(model: str | None, say) -> tuple[str, str]:
    """(what to load, the name to show). No MODEL: the default Instruct model when it is in the Hugging
    Face cache or can be downloaded, else one line saying so and the bundled demo model."""
    from olmo_local.checkpoint import resolve_model

    if model:
        return model, model
    try:
        path = resolve_model(DEFAULT_MODEL)
    except OlmoError as e:
        say(f"{e}; using the bundled demo model instead")  # the message names the model and why
        return "demo", "demo"
    return str(prepare_default_model(path, say)), DEFAULT_MODEL


def _open(name: str, device: str | None, ctx: int | None, kv_cache: str, progress):
    from olmo_local.runtime import open_model

    kwargs = {"device": device, "ctx": ctx, "progress": progress}
    if "kv_cache" in inspect.signature(open_model).parameters:
        kwargs["kv_cache"] = kv_cache
    return open_model(name, **kwargs)


@app.command()
def chat(
    model: Annotated[str | None, typer.Argument(help=f"model directory, Hugging Face repo id, or 'demo' "
                                                f"(default: {DEFAULT_MODEL}, else demo when offline)")] = None,
    system: Annotated[str | None, typer.Option("--system", help="system prompt")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: the model's, else 0.6)")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 = off")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    repeat_penalty: Annotated[float | None, typer.Option("--repeat-penalty", help="1 = off")] = None,
    seed: Annotated[int | None, typer.Option(help="makes the session's replies repeatable")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help="longest reply in tokens")] = None,
    ctx: Annotated[int | None, typer.Option(help="context size in tokens")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available)")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="weight format to use (shown by /show)")] = None,
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="auto (int8 on CUDA, else bf16), bf16 or int8")] = "auto",
    load: Annotated[Path | None, typer.Option("--load", help="start from a conversation saved with /save")] = None,
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="print replies as plain text")] = False,
    once: Annotated[bool, typer.Option("--once", help="not a terminal: read all of stdin as one message")] = False,
) -> None:
    """Chat in the terminal (slash commands: /help). Piped stdin: one message per line, plain replies."""
    from olmo_local.chat_session import ChatSession, Settings

    if kv_cache not in KV_CACHE_KINDS:
        raise OlmoError(f"unknown --kv-cache {kv_cache!r} (use auto, bf16 or int8)")
    interactive = sys.stdin.isatty() and not once
    if interactive:
        from rich.console import Console

        from olmo_local.chat_view import RichView
        console = Console(highlight=False)
        view = RichView(console, markdown=not no_markdown)
    else:
        from olmo_local.chat_view import PlainView
        view = PlainView()

    flags = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "repeat_penalty": repeat_penalty, "max_tokens": max_tokens}
    explicit = {k: v for k, v in flags.items() if v is not None}
    if seed is not None:
        explicit["seed"] = seed
    Settings().update(explicit)  # bad values fail before the model loads

    name, shown = resolve_chat_model(model, view.warn)
    name = apply_format(name, fmt, view.warn)
    rt = _load(name, device, ctx, kv_cache, view, interactive)
    settings = Settings.for_model(rt.path)
    settings.update(explicit)
    from olmo_local.chat_input import history_path
    hist = history_path() if interactive else None
    if kv_cache == "auto":  # what the runtime chose for this device
        kv_cache = "int8" if rt.state.kv_int8 else "bf16"
    session = ChatSession(rt, view, settings, system, model_name=shown, kv_cache=kv_cache,
                          history_file=hist)
    if kv_cache == "int8" and str(rt.state.k_cache.dtype) != "torch.int8":
        view.note("--kv-cache int8 is not available yet: the KV cache stays in the model's dtype")
    if load is not None:
        session.load(load)
        session.settings.update(explicit)  # flags win over the file
        if system is not None:
            session.system = system
    if interactive:
        _banner(session, rt)
        rc = run_interactive(session, hist)
    else:
        rc = run_piped(session, once)
    if rc:
        raise typer.Exit(rc)


def _load(name, device, ctx, kv_cache, view, interactive):
    if not interactive:
        return _open(name, device, ctx, kv_cache, None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=view.console, transient=True) as p:
        task = p.add_task(name, total=None)
        return _open(name, device, ctx, kv_cache, lambda done, total: p.update(task, completed=done, total=total))


def _banner(session, rt) -> None:
    v = session.view
    v.console.print(f"[bold]olmo-local chat[/] — {session.model_name} on {rt.device} · context "
                    f"{rt.state.max_ctx:,} tokens · loaded in {rt.load_s:.1f} s", highlight=False)
    v.note('Enter sends · """ starts/ends a multi-line message (Alt-Enter adds a newline) · /help lists '
           "commands · Ctrl-C stops a reply · Ctrl-D exits")
    if session.messages:
        v.note(f"{len(session.messages)} messages loaded")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''} (set OLMO_LOCAL_DEBUG=1 for details)"


def _run_line(session, line: str) -> bool:
    """One input line; errors become one line (never a traceback). False: end the session."""
    import torch

    try:
        return session.handle(line)
    except OlmoError as e:
        session.errors += 1
        session.view.error(str(e))
    except torch.cuda.OutOfMemoryError:
        session.errors += 1
        session.view.error("out of GPU memory (lower --ctx, /clear, or use a 4-bit model)")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the user sees one line, the session goes on
        if os.environ.get("OLMO_LOCAL_DEBUG") == "1":
            raise
        session.errors += 1
        session.view.error(_short(e))
    return True


def run_interactive(session, history_file: Path | None) -> int:
    from olmo_local.chat_input import LineReader

    reader = LineReader(history_file)
    view = session.view
    ctrl_c = False
    while True:
        mode, default = session.next_input or ("", "")
        prompt = "edit> " if mode == "edit" else ">>> "
        try:
            line = reader.read(prompt, default=default)
        except KeyboardInterrupt:
            if mode:  # Ctrl-C at a pre-filled prompt (/edit, a message given back) cancels it
                session.next_input = None
                continue
            if ctrl_c:
                break
            ctrl_c = True
            view.note("(Ctrl-C again or Ctrl-D to exit)")
            continue
        except EOFError:
            break
        ctrl_c = False
        if not line.strip():
            if mode:
                session.next_input = None
            continue
        try:
            if not _run_line(session, line):
                break
        except KeyboardInterrupt:  # outside generation (e.g. rendering); the session goes on
            view.note("interrupted")
    view.note("bye")
    return 0


def run_piped(session, once: bool) -> int:
    if once:
        text = sys.stdin.read().strip("\n")
        if not text.strip():
            raise OlmoError("stdin is empty: nothing to send")
        _run_line(session, "//" + text if text.startswith("/") else text)
    else:
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not _run_line(session, line):
                break
    return 1 if session.errors else 0
