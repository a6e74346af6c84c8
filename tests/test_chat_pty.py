"""`olmo-local chat` in a real pseudo-terminal (pexpect) on a tiny random checkpoint: streamed reply and
footer, /regen without re-reading the history (prefill counter), /undo, /save + /load, Ctrl-C during a
long reply, the history file across sessions, multi-line input, and clean exits (/bye, Ctrl-D, Ctrl-C
twice)."""

import json
import os
import re
import sys
import time

import pytest

from olmo_local.config import preset
from olmo_local.random_init import write_random_checkpoint

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")

PROMPT = ">>>"
# prompt_toolkit turns bracketed paste on when a prompt starts and off when the line is accepted: the
# text between those two marks is what the command printed (the typed line is redrawn before them)
PROMPT_END, PROMPT_START = "\x1b[?2004l", "\x1b[?2004h"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatpty") / "tiny"
    write_random_checkpoint(d, preset("tiny"), seed=9)
    return d


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg")


def spawn(tiny, data_home, cwd, *args):
    env = dict(os.environ, XDG_DATA_HOME=str(data_home), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", COLUMNS="200", LINES="50")
    env.pop("NO_COLOR", None)
    c = pexpect.spawn(sys.executable, ["-m", "olmo_local.cli", "chat", str(tiny), "--ctx", "4096", *args],
                      env=env, cwd=str(cwd), encoding="utf-8", dimensions=(50, 200), timeout=60,
                      # a Ctrl-C makes the terminal flush its output queue (no NOFLSH), which can cut a UTF-8
                      # character of the streamed reply in two: read such bytes as U+FFFD, as a terminal shows them
                      codec_errors="replace")
    c.expect(PROMPT)
    return c


def wait_prompt(c) -> str:
    """Wait until the line is accepted and the next prompt is up; what was printed in between."""
    c.expect_exact(PROMPT_END)
    c.expect_exact(PROMPT_START)
    out = ANSI.sub("", c.before)
    c.expect(PROMPT)
    return out


def command(c, line: str) -> str:
    """Send a line; return what it printed (without ANSI codes)."""
    c.sendline(line)
    return wait_prompt(c)


def stats(c) -> dict:
    out = command(c, "/stats")
    m = re.search(r"prefill passes: (\d+) \| tokens fed: (\d+) \(last turn (\d+)\)", out)
    ctx = re.search(r"context: (\d+)/(\d+) tokens", out)
    assert m and ctx, out
    return {"passes": int(m[1]), "fed": int(m[2]), "last": int(m[3]), "ctx": int(ctx[1])}


def test_chat_session_in_a_terminal(tiny, data_home, tmp_path):
    c = spawn(tiny, data_home, tmp_path, "--max-tokens", "8", "--seed", "3")
    try:
        out = command(c, "Hello there")
        assert re.search(r"prompt \d+ tok, [\d.,]+ tok/s · reply \d+ tok, [\d.,]+ tok/s · ttft [\d,]+ ms · ctx \S+ "
                         r"[\d,]+/4,096", out), out
        assert "reading" in out  # the live area before the first token
        command(c, "Second question")
        s1 = stats(c)
        assert s1["passes"] == 2

        # /regen restores the snapshot taken before the last turn: one prefill pass, only the new tokens
        out = command(c, "/regen")
        assert re.search(r"restored from a snapshot at \d+ tokens in [\d.]+ ms", out), out
        assert "tok/s" in out
        s2 = stats(c)
        assert s2["passes"] == s1["passes"] + 1 and s2["last"] == s1["last"] and s2["ctx"] > 0
        assert s2["fed"] == s1["fed"] + s1["last"]

        # /undo: no prefill, the context shrinks
        out = command(c, "/undo")
        assert "dropped the last exchange" in out and "restored" in out
        s3 = stats(c)
        assert s3["passes"] == s2["passes"] and s3["ctx"] < s2["ctx"]

        # /save, /clear, /load: the same conversation and state
        command(c, "Another one")
        before = stats(c)
        assert "saved 2 exchanges" in command(c, "/save conv.json")
        command(c, "/clear")
        assert stats(c)["ctx"] == 0
        assert "loaded 2 exchanges" in command(c, "/load conv.json")
        assert stats(c)["ctx"] == before["ctx"]
        command(c, "/save again.json")
        a, b = (json.loads((tmp_path / f).read_text()) for f in ("conv.json", "again.json"))
        assert a["messages"] == b["messages"] and a["state_tokens"] == b["state_tokens"]
        assert len(a["messages"]) == 4

        # Ctrl-C during a long reply stops it, keeps the partial answer, and the session goes on
        command(c, "/set max_tokens 3000")
        c.sendline("Tell me a very long story")
        c.expect("reading")
        time.sleep(1.5)
        c.send("\x03")
        c.expect("interrupted")
        c.expect_exact(PROMPT_START)
        c.expect(PROMPT)
        s4 = stats(c)
        assert 0 < s4["ctx"] < before["ctx"] + 3000
        saved = command(c, "/save partial.json")
        assert "saved 3 exchanges" in saved
        partial = json.loads((tmp_path / "partial.json").read_text())["messages"]
        assert partial[-1]["role"] == "assistant" and partial[-1]["content"]
        command(c, "/set max_tokens 4")
        assert "tok/s" in command(c, "still there?")

        # Ctrl-C at the prompt once only warns; /bye exits 0
        c.send("\x03")
        c.expect("Ctrl-C again")
        c.expect_exact(PROMPT_START)
        c.expect(PROMPT)
        c.sendline("/bye")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    hist = (data_home / "olmo-local" / "chat_history").read_text()
    assert "+Hello there" in hist and "+/bye" in hist


def test_history_multiline_and_exits(tiny, data_home, tmp_path):
    # plain streaming (--no-markdown), triple-quoted and Esc-Enter multi-line input
    c = spawn(tiny, data_home, tmp_path, "--max-tokens", "4", "--no-markdown")
    try:
        c.send('"""\rline a\rline b\r"""\r')
        assert "tok/s" in wait_prompt(c)
        c.send("x\x1b\ry\r")
        assert "tok/s" in wait_prompt(c)
        # /edit alone puts the last message back at the prompt for editing
        c.sendline("/edit")
        c.expect_exact(PROMPT_END)
        c.expect_exact(PROMPT_START)
        c.expect("edit>")
        c.send(" z\r")
        assert "message edited" in wait_prompt(c)
        command(c, "/save ml.json")
        msgs = json.loads((tmp_path / "ml.json").read_text())["messages"]
        assert [m["content"] for m in msgs if m["role"] == "user"] == ["line a\nline b", "x\ny z"]
        # the history crosses sessions: Up recalls earlier lines (here /save ml.json, then x\ny, ...)
        c.send("\x1b[A")
        c.expect("/save ml.json")
        c.send("\x15")  # Ctrl-U clears the line
        c.send("\x04")  # Ctrl-D on an empty line exits
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0

    c = spawn(tiny, data_home, tmp_path)
    try:
        c.send("\x03")
        c.expect("Ctrl-C again")
        c.send("\x03")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    assert "Traceback" not in ANSI.sub("", c.before or "")
