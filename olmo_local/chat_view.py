"""What a chat session shows: ``RichView`` for a terminal (streamed tokens, then the reply re-rendered as
markdown with highlighted code, ``<think>`` sections dimmed, a footer with speed and a context meter) and
``PlainView`` for pipes (the reply text alone on stdout, everything else on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Splits streamed text into (text, is_think) pieces at ``<think>`` / ``</think>``, holding back a
    tail that may be the start of a tag cut between tokens. The tags belong to the think part."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self._buf = ""

    def feed(self, piece: str) -> list[tuple[str, bool]]:
        self._buf += piece
        out: list[tuple[str, bool]] = []
        while True:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            i = self._buf.find(tag)
            if i >= 0:
                if self.in_think:
                    out.append((self._buf[:i + len(tag)], True))
                    self._buf = self._buf[i + len(tag):]
                    self.in_think = False
                else:
                    if i:
                        out.append((self._buf[:i], False))
                    self._buf = self._buf[i:]
                    self.in_think = True
                continue
            hold = next((k for k in range(min(len(tag) - 1, len(self._buf)), 0, -1)
                         if self._buf.endswith(tag[:k])), 0)
            emit = self._buf[:len(self._buf) - hold]
            self._buf = self._buf[len(self._buf) - hold:]
            if emit:
                out.append((emit, self.in_think))
            return out

    def flush(self) -> list[tuple[str, bool]]:
        buf, self._buf = self._buf, ""
        return [(buf, self.in_think)] if buf else []

    @classmethod
    def split(cls, text: str, in_think: bool = False) -> list[tuple[str, bool]]:
        """The whole text as merged (text, is_think) runs."""
        s = cls(in_think)
        runs: list[tuple[str, bool]] = []
        for seg, think in s.feed(text) + s.flush():
            if runs and runs[-1][1] == think:
                runs[-1] = (runs[-1][0] + seg, think)
            else:
                runs.append((seg, think))
        return runs


# ---- plain ------------------------------------------------------------------------------------
class PlainView:
    """For pipes and tests: replies on ``out`` (one per message, then a newline), the rest on ``err``."""

    interactive = False

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, footer: bool = True):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.show_footer = footer

    def _e(self, msg: str) -> None:
        self.err.write(msg + "\n")
        self.err.flush()

    def info(self, msg: str) -> None:
        self._e(msg)

    def note(self, msg: str) -> None:
        self._e(f"({msg})")

    def warn(self, msg: str) -> None:
        self._e(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self._e(f"error: {msg}")

    def table(self, title: str, rows: list[tuple[str, str]], tips: list[str] | None = None) -> None:
        w = max((len(k) for k, _ in rows), default=0)
        for k, v in rows:
            self._e(f"{k:<{w}}  {v}")
        for t in tips or []:
            self._e(t)

    def reply_start(self, think: bool = False, prompt_tokens: int = 0) -> None:
        pass

    def reply_piece(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()

    def reply_end(self, text: str, think: bool, footer: str, stop_reason: str) -> None:
        self.out.write("\n")
        self.out.flush()
        if footer and self.show_footer:
            self._e(f"[{footer}]")

    @contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        self._e(f"{label} ...")
        yield lambda done: None


# ---- rich -------------------------------------------------------------------------------------
class _Tail:
    """Renders only the last lines of a renderable that fit the screen, so a streaming reply never
    outgrows the live area (the complete reply is printed once it is done)."""

    def __init__(self, renderable, reserve: int = 3):
        self.renderable, self.reserve = renderable, reserve

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        keep = max(1, console.size.height - self.reserve)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


def render_reply(text: str, think: bool, markdown: bool = True):
    """The finished reply: think parts dimmed, the answer as markdown (code blocks highlighted)."""
    from rich.console import Group
    from rich.markdown import Markdown
    from rich.text import Text

    parts = []
    for seg, is_think in ThinkSplitter.split(text, think):
        if is_think:
            parts.append(Text(seg.strip("\n"), style="dim italic"))
        elif seg.strip():
            parts.append(Markdown(seg.strip("\n"), code_theme="monokai") if markdown else Text(seg.strip("\n")))
    return Group(*parts)


class RichView:
    """For a terminal. While generating, tokens appear as they come (plain text, think parts dimmed);
    when the reply is complete it is re-rendered as markdown unless ``markdown`` is off."""

    interactive = True

    def __init__(self, console=None, markdown: bool = True):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.markdown = markdown
        self._live = None
        self._text = None
        self._split: ThinkSplitter | None = None

    def info(self, msg: str) -> None:
        self.console.print(msg, markup=False, highlight=False)

    def note(self, msg: str) -> None:
        self.console.print(msg, style="dim", markup=False, highlight=False)

    def warn(self, msg: str) -> None:
        self.console.print(msg, style="yellow", markup=False, highlight=False)

    def error(self, msg: str) -> None:
        self.console.print(f"error: {msg}", style="bold red", markup=False, highlight=False)

    def table(self, title: str, rows: list[tuple[str, str]], tips: list[str] | None = None) -> None:
        from rich.table import Table

        t = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(k, v)
        self.console.print(t)
        for tip in tips or []:
            self.console.print(tip, style="dim", markup=False, highlight=False)

    # -- a reply --------------------------------------------------------------------------------
    def reply_start(self, think: bool = False, prompt_tokens: int = 0) -> None:
        from rich.live import Live
        from rich.spinner import Spinner
        from rich.text import Text

        self._split = ThinkSplitter(think)
        self._text = Text()
        if self.markdown and self.console.is_terminal:
            wait = Spinner("dots", Text(f"reading {prompt_tokens:,} tokens", style="dim"), style="dim")
            self._live = Live(wait, console=self.console, transient=True, refresh_per_second=12,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start(refresh=True)  # the spinner shows at once, however short the prompt

    def _show(self, runs: list[tuple[str, bool]]) -> None:
        for seg, is_think in runs:
            style = "dim" if is_think else ""
            if self._live is not None:
                self._text.append(seg, style=style)
            else:
                self.console.print(seg, style=style or None, end="", markup=False, highlight=False,
                                   soft_wrap=True)
        if self._live is not None and runs:
            self._live.update(_Tail(self._text))

    def reply_piece(self, piece: str) -> None:
        self._show(self._split.feed(piece))

    def reply_end(self, text: str, think: bool, footer: str, stop_reason: str) -> None:
        if self._split is not None:
            self._show(self._split.flush())
        if self._live is not None:
            self._live.stop()
            self._live = None
            if text.strip():
                self.console.print(render_reply(text, think, True))
        else:
            self.console.print()
        if footer:
            self.console.print(footer, style="dim", markup=False, highlight=False)
        self._split = None

    @contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        done = [0]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as p:
            task = p.add_task(label, total=total)

            def update(n: int) -> None:
                done[0] = n
                p.update(task, completed=n)

            yield update
        if done[0] >= total:
            self.console.print(f"{label}: done", style="dim", markup=False, highlight=False)
