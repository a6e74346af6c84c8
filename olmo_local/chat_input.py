"""Terminal input for the chat (prompt_toolkit): a history kept across sessions in the user's data
directory, Enter sends, ``\"\"\"`` starts and ends a multi-line message, Alt-Enter / Esc-Enter adds a
newline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TRIPLE = '"""'


def data_dir() -> Path:
    """``$XDG_DATA_HOME/olmo-local`` (default ``~/.local/share/olmo-local``; ``%LOCALAPPDATA%`` on Windows)."""
    base = os.environ.get("XDG_DATA_HOME")
    if not base and sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
    root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
    return root / "olmo-local"


def history_path() -> Path:
    return data_dir() / "chat_history"


def in_triple_quote(text: str) -> bool:
    """True while a message opened with \"\"\" is not closed yet (Enter then adds a newline)."""
    s = text.strip()
    return s.startswith(TRIPLE) and not (len(s) >= 2 * len(TRIPLE) and s.endswith(TRIPLE))


def strip_triple_quote(text: str) -> str:
    """The message inside \"\"\" ... \"\"\" (unchanged when it is not quoted)."""
    s = text.strip()
    if not s.startswith(TRIPLE):
        return text
    return s[len(TRIPLE):].removesuffix(TRIPLE).strip("\n")


class LineReader:
    """Reads one message (or command) per call; raises EOFError on Ctrl-D and KeyboardInterrupt on
    Ctrl-C, like ``input()``."""

    def __init__(self, history_file: Path | None = None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        history = InMemoryHistory()
        self.history_file = None
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history_file.touch(exist_ok=True)
                history = FileHistory(str(history_file))
                self.history_file = history_file
            except OSError:
                pass  # a read-only home: history for this session only

        kb = KeyBindings()
        quoted = Condition(lambda: in_triple_quote(self._session.default_buffer.text))

        @kb.add("enter", filter=quoted)
        def _newline_in_quote(event):
            event.current_buffer.insert_text("\n")

        @kb.add("enter", filter=~quoted)
        def _send(event):
            event.current_buffer.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        self._session = PromptSession(history=history, key_bindings=kb, multiline=True,
                                      prompt_continuation=lambda width, line_no, wrap: "... ".rjust(width),
                                      enable_open_in_editor=False)

    def read(self, prompt: str = ">>> ", default: str = "") -> str:
        return strip_triple_quote(self._session.prompt(prompt, default=default))
