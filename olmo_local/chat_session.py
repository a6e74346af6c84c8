"""A chat conversation over one loaded model: messages, sampling settings, slash commands, and the
decode state kept in step with the conversation through snapshots.

No terminal code lives here: a ``ChatSession`` talks to a *view* (``olmo_local.chat_view``) and can be
driven directly by tests (``session.handle("/regen")``).

How the state follows the conversation
--------------------------------------
Each turn renders the whole conversation with the chat template, compares the tokens with what the
state holds (``state.tokens``) and feeds only the new ones. Two snapshots per turn are kept (within a
memory budget): one just before the turn's new tokens are fed, one right after the prompt is read
(when the first reply token is sampled). ``/regen``, ``/undo`` and ``/edit`` restore a snapshot instead
of re-reading the history; when the rendering diverges from the state (a reply that re-tokenizes
differently, a template that rewrites old turns), the latest snapshot whose tokens are a prefix of the
rendering is restored and the rest fed. A snapshot is valid while its tokens are a prefix of the
state's: KV rows below a position depend only on the tokens before it.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

from olmo_local.chat_view import THINK_CLOSE, THINK_OPEN
from olmo_local.errors import OlmoError
from olmo_local.generate import GenStats, SamplingParams
from olmo_local.state import Snapshot

SAVE_FORMAT = "olmo-local-chat"
SAVE_VERSION = 1
SNAPSHOT_BUDGET = 512 * 2**20  # bytes of snapshots kept (at least MIN_SNAPSHOTS)
MIN_SNAPSHOTS, MAX_SNAPSHOTS = 4, 64
REPLY_RESERVE = 64  # a message is refused unless this many reply tokens (or max_tokens) still fit
LOAD_SNAPSHOT_TURNS = 4  # /load takes snapshots at the boundaries of this many last turns


class ContextFull(OlmoError):
    """The conversation plus the new message does not fit the context."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


class _Stopped(Exception):
    """Ctrl-C during a re-read: stop at the chunk boundary (the state is consistent there)."""


# ---- settings ---------------------------------------------------------------------------------
@dataclass
class Settings:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None

    ALIASES: ClassVar[dict[str, str]] = {"temp": "temperature", "max_new_tokens": "max_tokens", "n": "max_tokens",
               "repetition_penalty": "repeat_penalty"}

    @classmethod
    def for_model(cls, model_dir: Path) -> Settings:
        """Defaults, with the sampling values of the model's generation_config.json when it has them."""
        s = cls()
        try:
            gc = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return s
        if isinstance(gc, dict) and gc.get("do_sample", True):
            for key in ("temperature", "top_p", "top_k", "min_p"):
                v = gc.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    try:
                        s.set(key, str(v))
                    except OlmoError:
                        pass
        return s

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def params(self, seed_offset: int = 0) -> SamplingParams:
        p = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                           repeat_penalty=self.repeat_penalty, max_new_tokens=self.max_tokens,
                           seed=None if self.seed is None else self.seed + seed_offset)
        p.validate()
        return p

    def set(self, key: str, value: str) -> None:
        """Set one setting from text; OlmoError (and no change) if the key or value is bad."""
        key = key.strip().lower().replace("-", "_")
        key = self.ALIASES.get(key, key)
        if key not in self.names():
            raise OlmoError(f"unknown setting {key!r} (settings: {', '.join(self.names())})")
        value = value.strip()
        if key == "seed" and value.lower() in ("none", "off", "random", ""):
            new = None
        else:
            kind = int if key in ("top_k", "max_tokens", "seed") else float
            try:
                new = kind(value)
            except ValueError:
                raise OlmoError(f"{key} needs {'an integer' if kind is int else 'a number'}, "
                                f"not {value!r}") from None
        old = getattr(self, key)
        setattr(self, key, new)
        try:
            if key == "max_tokens" and new < 1:
                raise OlmoError("max_tokens must be >= 1")
            self.params()
        except OlmoError:
            setattr(self, key, old)
            raise

    def update(self, values: dict) -> None:
        for k, v in values.items():
            if v is not None or k == "seed":
                self.set(k, "none" if v is None else str(v))

    def describe(self) -> str:
        return ", ".join(f"{k} {'none' if v is None else v}" for k, v in asdict(self).items())


# ---- files ------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``:
    the file is either the old one or the complete new one, never half written."""
    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise OlmoError(f"cannot save to {path}: the directory {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OlmoError(f"cannot save to {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OlmoError(f"could not save {path}: {e.strerror or e} (the old file, if any, is intact)") from None
        raise
    return path


def _read_save(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OlmoError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OlmoError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise OlmoError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise OlmoError(f"{path} is not a conversation saved by olmo-local chat")
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in msgs):
        raise OlmoError(f"{path}: 'messages' must be a list of {{role: user|assistant, content: text}}")
    if data.get("system") is not None and not isinstance(data["system"], str):
        raise OlmoError(f"{path}: 'system' must be text or null")
    if not isinstance(data.get("settings", {}), dict):
        raise OlmoError(f"{path}: 'settings' must be an object")
    return data


# ---- the session ------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    args: str
    help: str
    fn: Callable[[str], bool | None]


class ChatSession:
    """One conversation with one loaded model (``olmo_local.runtime.Runtime``)."""

    def __init__(self, rt, view, settings: Settings | None = None, system: str | None = None, *,
                 model_name: str | None = None,
                 kv_cache: str = "bf16", history_file: Path | None = None):
        self.rt, self.view = rt, view
        self.tok, self.state, self.gen = rt.tokenizer, rt.state, rt.generator
        self.settings = settings or Settings.for_model(rt.path)
        self.system = system or None
        self.messages: list[dict] = []  # user / assistant turns (the system prompt is self.system)
        self.model_name = model_name or str(rt.path)
        self.kv_cache = kv_cache
        self.history_file = history_file
        self.snapshots: list[Snapshot] = []
        self.stop_requested = False
        self.pending: str | None = None  # a message refused because the context is full
        self.next_input: tuple[str, str] | None = None  # (mode, text) the UI pre-fills: "edit"/"send"
        self.errors = 0
        # counters (/stats)
        self.n_generations = 0
        self.n_replies = 0
        self.fed_total = 0
        self.fed_last = 0
        self.gen_total = 0
        self.decode_s_total = 0.0
        self.last_stats: GenStats | None = None
        self.last_restore_ms: float | None = None
        self.commands = self._make_commands()

    # ---- rendering ----------------------------------------------------------------------------
    def api_messages(self, messages: list[dict] | None = None) -> list[dict]:
        msgs = self.messages if messages is None else messages
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": m["role"], "content": m["content"]} for m in msgs]

    def render_text(self, messages: list[dict] | None = None, gen: bool = True) -> str:
        return self.tok.apply_chat_template(self.api_messages(messages), add_generation_prompt=gen)

    def render(self, messages: list[dict] | None = None, gen: bool = True) -> list[int]:
        msgs = self.messages if messages is None else messages
        if not msgs and not self.system and not gen:
            return []
        return self.tok.encode(self.render_text(msgs, gen))

    # ---- snapshots ----------------------------------------------------------------------------
    def _valid(self, s: Snapshot) -> bool:
        return s.pos <= self.state.pos and s.tokens == self.state.tokens[:s.pos]

    def _take_snapshot(self) -> None:
        st = self.state
        self.snapshots = [s for s in self.snapshots if self._valid(s)]
        if st.pos == 0 or any(s.pos == st.pos for s in self.snapshots):
            return
        self.snapshots.append(st.snapshot())
        self.snapshots.sort(key=lambda s: s.pos)
        per = max(1, self.snapshots[-1].nbytes)
        cap = min(MAX_SNAPSHOTS, max(MIN_SNAPSHOTS, SNAPSHOT_BUDGET // per))
        if len(self.snapshots) > cap:
            del self.snapshots[:len(self.snapshots) - cap]

    def _restore(self, snap: Snapshot | None) -> float:
        """Restore ``snap`` (None: the empty state); returns the milliseconds it took."""
        t0 = time.perf_counter()
        if snap is None:
            self.state.reset()
        else:
            self.state.restore(snap)
        if self.state.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        self.snapshots = [s for s in self.snapshots if s.pos <= self.state.pos]
        self.last_restore_ms = ms
        return ms

    def _rewind(self, target: list[int], allow_full: bool) -> float | None:
        """Make the state a prefix of ``target`` (with at least one token left to feed unless
        ``allow_full``) by restoring the latest valid snapshot. Returns the restore time in ms, or None
        when the state already was such a prefix."""
        st = self.state
        cp = st.common_prefix(target)
        if cp == len(st.tokens) and (allow_full or cp < len(target)):
            return None
        limit = cp if allow_full else min(cp, len(target) - 1)
        best = None
        for s in self.snapshots:
            if s.pos <= limit and self._valid(s):
                best = s  # sorted by pos: the last one wins
        return self._restore(best)

    # ---- turns --------------------------------------------------------------------------------
    def reserve(self) -> int:
        return min(self.settings.max_tokens, REPLY_RESERVE)

    def _check_fits(self, ids: list[int]) -> None:
        need = len(ids) + self.reserve()
        if need > self.state.max_ctx:
            exchanges = self._n_exchanges()
            what = "your message" if not exchanges else "the conversation plus your message"
            hint = ("/drop removes the oldest exchanges to make room (the rest is re-read), /clear starts "
                    "over" if exchanges else "shorten the message")
            raise ContextFull(f"context full: {what} needs {len(ids):,} tokens (+{self.reserve()} for the "
                              f"reply) but the context holds {self.state.max_ctx:,}. {hint}, or restart "
                              "with a larger --ctx. The message was not sent.", need)

    def _n_exchanges(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    def send(self, text: str) -> str | None:
        """A user message: answer it. Returns the reply text (None if it was refused)."""
        if not text.strip():
            raise OlmoError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.render()
            self._check_fits(ids)
        except ContextFull:
            self.messages.pop()
            self.pending = text
            if self.view.interactive:
                self.next_input = None
            raise
        except BaseException:
            self.messages.pop()
            raise
        self.pending = None
        user = self.messages[-1]
        try:
            return self._respond(ids)
        except BaseException:
            if self.messages and self.messages[-1] is user:
                self.messages.pop()
            raise

    def _respond(self, ids: list[int] | None = None) -> str | None:
        """Generate the assistant reply to the conversation (which ends with a user message)."""
        if ids is None:
            ids = self.render()
            self._check_fits(ids)
        self._rewind(ids, allow_full=False)
        new = ids[self.state.pos:]
        think = self.render_text().rstrip().endswith(THINK_OPEN)
        return self._generate(new, think)

    @contextmanager
    def _sigint(self) -> Iterator[None]:
        """During generation the first Ctrl-C asks to stop at the next token; a second one interrupts at
        once (the caller then restores the snapshot taken before the turn)."""
        self.stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    def _generate(self, new_ids: list[int], think: bool) -> str | None:
        st = self.state
        self._take_snapshot()
        pre_pos, pre = st.pos, next((s for s in self.snapshots if s.pos == st.pos), None)
        params = self.settings.params(seed_offset=self.n_generations)
        self.n_generations += 1
        think_ids = {i for i in (self.tok.token_to_id(THINK_OPEN), self.tok.token_to_id(THINK_CLOSE))
                     if i is not None}
        from olmo_local.tokenizer import IncrementalDetokenizer
        detok = IncrementalDetokenizer(self.tok)
        parts: list[str] = []
        hard = False
        got_first = False
        self.fed_last = len(new_ids)
        self.fed_total += len(new_ids)
        self.view.reply_start(think=think, prompt_tokens=len(new_ids))
        stream = self.gen.stream(new_ids, params, self.tok.stop_ids, self.rt.n_valid)
        try:
            with self._sigint():
                try:
                    for t in stream:
                        if not got_first:
                            got_first = True
                            self._take_snapshot()  # the prompt is read; the sampled token is not fed yet
                        if t in think_ids:
                            piece = detok.flush() + self.tok.id_to_token(t)
                            detok = IncrementalDetokenizer(self.tok)
                        else:
                            piece = detok.push(t)
                        if piece:
                            parts.append(piece)
                            self.view.reply_piece(piece)
                        if self.stop_requested:
                            break
                finally:
                    stream.close()
                tail = detok.flush()
                if tail:
                    parts.append(tail)
                    self.view.reply_piece(tail)
        except KeyboardInterrupt:
            hard = True
        except BaseException:
            self._restore(pre) if pre_pos else self._restore(None)
            self.view.reply_end("".join(parts), think, "", "error")
            raise
        stats = self.gen.stats
        if hard:
            # interrupted inside a model call: the state may be half-updated; go back to before the turn
            self._restore(pre if pre_pos else None)
            stats.stop_reason = "interrupted"
        elif self.stop_requested:
            stats.stop_reason = "interrupted"
        if not hard and not got_first and st.pos == pre_pos + len(new_ids):
            self._take_snapshot()
        text = "".join(parts)
        self.last_stats = stats
        self.gen_total += stats.gen_tokens
        self.decode_s_total += stats.decode_s
        if stats.stop_reason == "interrupted" and not text:
            # nothing came: drop the message; in a terminal it goes back to the prompt, nothing is lost
            user = self.messages.pop()
            if not hard:
                self._restore(pre if pre_pos else None)
            self.view.reply_end("", think, self.footer(stats), "interrupted")
            if self.view.interactive:
                self.next_input = ("send", user["content"])
                self.view.note("stopped before any text; your message is back at the prompt")
            else:
                self.view.note("stopped before any text; the message was dropped")
            return None
        self.messages.append({"role": "assistant", "content": text})
        self.n_replies += 1
        self.view.reply_end(text, think, self.footer(stats), stats.stop_reason)
        if stats.stop_reason == "context":
            self.view.warn(f"context full ({st.pos:,}/{st.max_ctx:,} tokens): the reply was cut. /drop removes "
                           "the oldest exchanges (the rest is re-read), /clear starts over.")
        elif stats.stop_reason == "length" and self.view.interactive:
            self.view.note(f"reply stopped at max_tokens ({self.settings.max_tokens}); "
                           "/set max_tokens N for longer replies")
        return text

    def footer(self, st: GenStats) -> str:
        """One line per reply: prompt tokens and speed, generated tokens and speed, time to first token,
        and the context meter (used / max)."""
        used, cap = self.state.pos, self.state.max_ctx
        return (f"prompt {st.prompt_tokens:,} tok, {st.prefill_tps:,.1f} tok/s · reply {st.gen_tokens:,} tok, "
                f"{st.decode_tps:,.1f} tok/s · ttft {st.ttft_s * 1000:,.0f} ms · "
                f"ctx {meter(used, cap)} {used:,}/{cap:,}"
                + (" · interrupted" if st.stop_reason == "interrupted" else ""))

    # ---- re-reading (load, drop) ---------------------------------------------------------------
    def _boundaries(self, target: list[int]) -> list[int]:
        """Token positions in ``target`` where the last turns start and their prompts end: snapshots
        there let /undo and /regen after a /load or /drop restore instead of re-reading."""
        cuts: set[int] = set()
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"][-LOAD_SNAPSHOT_TURNS:]
        for i in users:
            for msgs, gen in ((self.messages[:i], False), (self.messages[:i + 1], True)):
                try:
                    ids = self.render(msgs, gen)
                except OlmoError:
                    continue
                n = 0
                for a, b in zip(ids, target):
                    if a != b:
                        break
                    n += 1
                if 0 < n < len(target):
                    cuts.add(n)
        return sorted(cuts)

    def _stable_tokens(self) -> list[int]:
        """The tokens of the conversation that the next turn's rendering is sure to start with."""
        if not self.messages and not self.system:
            return []
        stable = self.render(gen=False)
        nxt = self.render(self.messages + [{"role": "user", "content": "x"}], True)
        n = 0
        for a, b in zip(stable, nxt):
            if a != b:
                break
            n += 1
        return stable[:n]

    def _refeed(self, target: list[int], label: str) -> None:
        """Bring the state to ``target`` (restore a snapshot, feed the rest with progress)."""
        if len(target) > self.state.max_ctx:
            raise OlmoError(f"{label}: {len(target):,} tokens do not fit the context of {self.state.max_ctx:,}")
        self._rewind(target, allow_full=True)
        rest_from = self.state.pos
        total = len(target) - rest_from
        if total <= 0:
            return
        cuts = [c for c in self._boundaries(target) if c > rest_from] + [len(target)]
        done = 0
        self.stop_requested = False
        with self.view.progress(f"{label}: re-reading {total:,} tokens", total) as update:
            try:
                with self._sigint():
                    start = rest_from
                    for end in cuts:
                        self._take_snapshot()
                        seg = target[start:end]

                        def cb(n, _total, base=done):
                            update(base + n)
                            if self.stop_requested:
                                raise _Stopped

                        self.gen.prefill(seg, progress=cb)
                        self.fed_total += len(seg)
                        self.fed_last = len(seg)
                        done += len(seg)
                        start = end
            except _Stopped:
                pass
            except KeyboardInterrupt:
                good = [s for s in self.snapshots if self._valid(s)]
                self._restore(good[-1] if good else None)
            except BaseException:
                good = [s for s in self.snapshots if self._valid(s)]
                self._restore(good[-1] if good else None)
                raise
        if self.state.pos < len(target):
            self.view.note(f"stopped re-reading at {self.state.pos:,}/{len(target):,} tokens; "
                           "the rest is read with your next message")
        else:
            self._take_snapshot()

    # ---- dispatch -----------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One line of input: a slash command or a message. Returns False when the session should end."""
        mode = self.next_input[0] if self.next_input else None
        self.next_input = None
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            name, _, args = line[1:].partition(" ")
            if not name.strip():
                raise OlmoError("empty command (try /help)")
            cmd = self._find(name)
            if cmd is None:
                raise OlmoError(f"unknown command /{name} (try /help; start a message with // to send a "
                                "leading /)")
            return cmd.fn(args.strip()) is not False
        if mode == "edit":
            self.cmd_edit(line)
        else:
            self.send(line)
        return True

    def _find(self, name: str) -> Command | None:
        name = name.lower()
        aliases = {"exit": "bye", "quit": "bye", "q": "bye", "r": "regen", "e": "edit", "?": "help",
                   "reset": "clear", "h": "help"}
        name = aliases.get(name, name)
        return next((c for c in self.commands if c.name == name), None)

    def _make_commands(self) -> list[Command]:
        return [
            Command("help", "", "list the commands", self.cmd_help),
            Command("system", "[TEXT|-]", "show / set / remove (-) the system prompt", self.cmd_system),
            Command("set", "[KEY VALUE]", "show settings, or set temperature|top_p|top_k|min_p|repeat_penalty|"
                    "max_tokens|seed (seed none = random)", self.cmd_set),
            Command("show", "", "model, format, device, settings, memory", self.cmd_show),
            Command("clear", "", "start a new conversation (keeps the system prompt and settings)",
                    self.cmd_clear),
            Command("regen", "", "a new answer to the last message (restores a snapshot, no re-read)",
                    self.cmd_regen),
            Command("undo", "", "drop the last exchange (restores a snapshot)", self.cmd_undo),
            Command("edit", "[NEW TEXT]", "rewrite the last message and answer it again", self.cmd_edit),
            Command("drop", "[N]", "drop the N oldest exchanges to make room (re-reads the rest)", self.cmd_drop),
            Command("save", "FILE", "save the conversation and settings as JSON", self.cmd_save),
            Command("load", "FILE", "load a saved conversation and settings", self.cmd_load),
            Command("stats", "", "speed, prefill passes, tokens fed, context, snapshots", self.cmd_stats),
            Command("bye", "", "exit (also /exit, Ctrl-D)", self.cmd_bye),
        ]

    # ---- commands -----------------------------------------------------------------------------
    def cmd_help(self, args: str) -> None:
        rows = [(f"/{c.name}" + (f" {c.args}" if c.args else ""), c.help) for c in self.commands]
        tips = [('Enter sends. """ on its own starts and ends a multi-line message; Alt-Enter (or Esc then '
                 "Enter) adds a newline."),
                "Ctrl-C stops a reply (the partial answer is kept); Ctrl-C twice or Ctrl-D at the prompt exits.",
                "Start a message with // to send a text that begins with /."]
        self.view.table("commands", rows, tips)

    def cmd_system(self, args: str) -> None:
        if not args:
            self.view.info(f"system prompt: {self.system!r}" if self.system else
                           "no system prompt (the chat template's default applies)")
            return
        self.system = None if args == "-" else args
        used = self.state.pos
        what = "removed" if self.system is None else "set"
        if self.messages:
            self.view.info(f"system prompt {what}; the conversation ({used:,} tokens) is re-read with your "
                           "next message")
        else:
            self.view.info(f"system prompt {what}")

    def cmd_set(self, args: str) -> None:
        if not args:
            self.view.info(f"settings: {self.settings.describe()}")
            return
        key, _, value = args.partition(" ")
        if key.lower() == "system":
            return self.cmd_system(value.strip())
        if not value.strip():
            raise OlmoError(f"usage: /set {key} VALUE")
        self.settings.set(key, value)
        k = Settings.ALIASES.get(key.lower().replace("-", "_"), key.lower().replace("-", "_"))
        v = getattr(self.settings, k)
        self.view.info(f"{k} = {'none' if v is None else v}")

    def memory_rows(self) -> list[tuple[str, str]]:
        model = self.rt.model
        wbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        snap = sum(s.nbytes for s in self.snapshots)
        rows = [("weights", _bytes(wbytes)),
                ("decode state", f"{_bytes(self.state.nbytes)} for {self.state.max_ctx:,} tokens"),
                ("snapshots", f"{len(self.snapshots)} ({_bytes(snap)})")]
        rss = _rss()
        if rss:
            rows.append(("process RSS", _bytes(rss)))
        if self.state.device.type == "cuda":
            dev = self.state.device
            used = _bytes(torch.cuda.memory_allocated(dev))
            rows.append(("GPU allocated", f"{used} (reserved {_bytes(torch.cuda.memory_reserved(dev))})"))
        return rows

    def cmd_show(self, args: str) -> None:
        cfg = self.rt.config
        q = cfg.extra.get("quantization_config") or {}
        fmt = q.get("format", q.get("quant_method", "unquantized"))

        kv = str(self.state.k_cache.dtype).replace("torch.", "")
        kv_note = f"{kv}" + (f" (asked for {self.kv_cache})" if self.kv_cache == "int8" and kv != "int8" else "")
        rows = [("model", f"{self.model_name} ({cfg.num_params():,} parameters)"),
                ("path", str(self.rt.path)),
                ("format", fmt),
                ("device", f"{self.rt.device} ({str(self.state.dtype).replace('torch.', '')})"),
                ("context", f"{self.state.pos:,}/{self.state.max_ctx:,} tokens (KV cache {kv_note})"),
                ("settings", self.settings.describe()),
                ("system", repr(self.system) if self.system else "(none)"),
                ("conversation", f"{_n(self._n_exchanges(), 'exchange')}, {_n(len(self.messages), 'message')}")]
        rows += self.memory_rows()
        if self.history_file:
            rows.append(("history file", str(self.history_file)))
        self.view.table("session", rows)

    def cmd_clear(self, args: str) -> None:
        self.messages = []
        self.pending = None
        self._restore(None)
        self.snapshots = []
        self.view.info(f"conversation cleared (context 0/{self.state.max_ctx:,})")

    def _last_user(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return i
        raise OlmoError("there is no message yet")

    def _restored_note(self, what: str, ms: float | None) -> None:
        if ms is None:
            self.view.info(what)
        else:
            self.view.info(f"{what} (state restored from a snapshot at {self.state.pos:,} tokens in "
                           f"{ms:.2f} ms, no re-read)")

    def cmd_regen(self, args: str) -> None:
        i = self._last_user()
        self.messages = self.messages[:i + 1]
        ids = self.render()
        self._check_fits(ids)
        ms = self._rewind(ids, allow_full=False)
        self._restored_note("regenerating the last answer", ms)
        self._respond(ids)

    def cmd_undo(self, args: str) -> None:
        i = self._last_user()
        self.messages = self.messages[:i]
        ms = self._rewind(self.render(gen=False), allow_full=True)
        self._restored_note(f"dropped the last exchange ({self._n_exchanges()} left)", ms)

    def cmd_edit(self, args: str) -> None:
        i = self._last_user()
        if not args:
            if self.view.interactive:
                self.next_input = ("edit", self.messages[i]["content"])
                return
            raise OlmoError("usage: /edit NEW TEXT (replaces your last message and answers it again)")
        old = self.messages
        self.messages = self.messages[:i] + [{"role": "user", "content": args}]
        try:
            ids = self.render()
            self._check_fits(ids)
        except BaseException:
            self.messages = old
            raise
        ms = self._rewind(ids, allow_full=False)
        self._restored_note("message edited", ms)
        self._respond(ids)

    def cmd_drop(self, args: str) -> None:
        n_ex = self._n_exchanges()
        if n_ex == 0:
            raise OlmoError("there is nothing to drop")
        if args:
            try:
                n = int(args)
            except ValueError:
                raise OlmoError("usage: /drop [N] (N: how many of the oldest exchanges)") from None
            if n < 1:
                raise OlmoError("usage: /drop [N] with N >= 1")
        else:
            n = 1
            if self.pending is not None:  # as many as the refused message needs
                while n < n_ex:
                    msgs = self._without_oldest(n) + [{"role": "user", "content": self.pending}]
                    if len(self.render(msgs)) + self.reserve() <= self.state.max_ctx:
                        break
                    n += 1
        n = min(n, n_ex)
        before = self.state.pos
        self.messages = self._without_oldest(n)
        target = self._stable_tokens()
        self.view.info(f"dropped the {n} oldest exchange{'s' if n > 1 else ''}; the remaining "
                       f"{len(target):,} tokens are re-read (a re-prefill; they were {before:,})")
        self._refeed(target, "dropping old turns")
        if self.pending is not None:
            if len(self.render(self.messages + [{"role": "user", "content": self.pending}])) + self.reserve() \
                    > self.state.max_ctx:
                self.view.warn("your message still does not fit: /drop more, /clear, or shorten it")
            elif self.view.interactive:
                self.next_input = ("send", self.pending)
                self.view.note("your message is back at the prompt: press Enter to send it")
            else:
                self.view.note("send your message again")

    def _without_oldest(self, n: int) -> list[dict]:
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if n >= len(users):
            return []
        return self.messages[users[n]:]

    def to_dict(self) -> dict:
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": self.model_name,
                "model_path": str(Path(self.rt.path).resolve()), "system": self.system,
                "settings": asdict(self.settings), "messages": [dict(m) for m in self.messages],
                "state_tokens": list(self.state.tokens)}

    def cmd_save(self, args: str) -> None:
        if not args:
            raise OlmoError("usage: /save FILE")
        path = write_atomic(args, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")
        self.view.info(f"saved {_n(self._n_exchanges(), 'exchange')} and the settings to {path}")

    def cmd_load(self, args: str) -> None:
        if not args:
            raise OlmoError("usage: /load FILE")
        self.load(Path(args).expanduser())

    def load(self, path: Path) -> None:
        data = _read_save(path)
        settings = Settings(**asdict(self.settings))
        unknown = [k for k in data.get("settings", {}) if k not in Settings.names()]
        settings.update({k: v for k, v in data.get("settings", {}).items() if k not in unknown})
        old = (self.system, self.messages)
        self.system, self.messages = data.get("system") or None, [dict(m) for m in data["messages"]]
        try:
            target = None
            toks = data.get("state_tokens")
            same_model = data.get("model_path") == str(Path(self.rt.path).resolve())
            if same_model and isinstance(toks, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.rt.n_valid for t in toks):
                target = toks
            if target is None:
                target = self._stable_tokens()
            if len(target) + 1 > self.state.max_ctx:
                raise OlmoError(f"{path} holds {len(target):,} tokens of conversation but the context holds "
                                f"{self.state.max_ctx:,}; restart with a larger --ctx")
        except BaseException:
            self.system, self.messages = old
            raise
        self.settings = settings
        self.pending = None
        self._refeed(target, "loading")
        extra = f" (ignored unknown settings: {', '.join(unknown)})" if unknown else ""
        self.view.info(f"loaded {_n(self._n_exchanges(), 'exchange')} from {path} "
                       f"(context {self.state.pos:,}/{self.state.max_ctx:,}){extra}")

    def cmd_stats(self, args: str) -> None:
        st = self.last_stats
        snap = sum(s.nbytes for s in self.snapshots)
        avg = (f", {self.gen_total / self.decode_s_total:.1f} tok/s on average"
               if self.decode_s_total > 0 else "")
        restore = f"{self.last_restore_ms:.2f} ms" if self.last_restore_ms is not None else "none"
        lines = [
            (f"prefill passes: {self.gen.prefill_calls} | tokens fed: {self.fed_total} (last turn {self.fed_last})"
             f" | generated: {self.gen_total} tokens in {_n(self.n_replies, 'reply')}{avg}"),
            (f"context: {self.state.pos}/{self.state.max_ctx} tokens | snapshots: {len(self.snapshots)} "
             f"({_bytes(snap)}) | last restore: {restore}"),
        ]
        if st is not None:
            lines.append(f"last reply: {self.footer(st)} | stop: {st.stop_reason}")
        for line in lines:
            self.view.info(line)

    def cmd_bye(self, args: str) -> bool:
        return False


# ---- small helpers ----------------------------------------------------------------------------
def meter(used: int, cap: int, width: int = 10) -> str:
    """A context meter: ``█████░░░░░`` for half full."""
    frac = 0.0 if cap <= 0 else min(1.0, used / cap)
    full = min(width, int(frac * width + 0.5)) if used < cap else width
    return "\u2588" * full + "\u2591" * (width - full)


def _n(k: int, word: str) -> str:
    """``1 reply``, ``2 replies``, ``3 exchanges``."""
    if k == 1:
        return f"{k} {word}"
    return f"{k} {word[:-1]}ies" if word.endswith("y") else f"{k} {word}s"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
    except Exception:  # noqa: BLE001 - best effort
        return None
