"""Tokenizer, chat template and streaming detokenizer, on the real Dolma-2 tokenizer
(shipped in olmo_local/assets/dolma2, see its NOTICE) and on a tiny sentencepiece model trained here."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from olmo_local.chat_template import BUILTIN_CHAT_TEMPLATE
from olmo_local.errors import OlmoError
from olmo_local.tokenizer import IncrementalDetokenizer, Tokenizer

DOLMA2 = Path(__file__).parent.parent / "olmo_local" / "assets" / "dolma2"
IM_START, IM_END, EOT, PAD = 100264, 100265, 100257, 100277


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DOLMA2)


def dolma2_dir(tmp_path: Path, **files: object) -> Path:
    """A model dir holding (a link to) the Dolma-2 tokenizer.json plus the given files."""
    os.symlink(DOLMA2 / "tokenizer.json", tmp_path / "tokenizer.json")
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


# -- encode / decode on Dolma-2 ---------------------------------------------------------------------

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 pm, and I've 1,234,567 things to do!",
    ("def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
     "\treturn fib(n - 1) + fib(n - 2)  # tabs\n\n\n"),
    "naïve café, Straße, Ωμέγα, Привет, مرحبا, नमस्ते — “quotes” ‘single’ …",
    ("emoji 😀🎉👩‍👩‍👧 🇺🇳 ✓ and CJK 中文字符 日本語のテキスト 한국어 "
     "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width"),
    "  leading and trailing spaces  \r\n windows line \x00 nul \x7f del",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_readme_example_ids(tok: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = [100264, 882, 198, 13347, 100265, 198, 100264, 78191, 198]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nHi\nassistant\n"


def test_vocab_specials_and_no_bos(tok: Tokenizer) -> None:
    assert tok.vocab_size == 100278
    assert tok.encode("Hi") == [13347]  # no BOS, no EOS
    assert tok.encode("") == []
    assert tok.encode("a<|endoftext|>b<|pad|>") == [64, EOT, 65, PAD]
    assert tok.token_to_id("<|im_start|>") == IM_START
    assert tok.token_to_id("<|im_end|>") == IM_END
    assert tok.token_to_id("<|no such token|>") is None
    assert tok.id_to_token(IM_END) == "<|im_end|>"
    assert tok.stop_ids == frozenset({IM_END, EOT})
    assert tok.eos_token == "<|endoftext|>"
    assert tok.chat_template_is_builtin and tok.chat_template == BUILTIN_CHAT_TEMPLATE


# -- built-in chat template ------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_builtin_template_with_system_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "You are a concise assistant."}, *CONVERSATION]
    expected = (
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n")
    assert tok.encode_chat(messages) == tok.encode(expected)
    assert tok.encode_chat(messages)[:1] == [IM_START]


def test_builtin_template_without_system_prompt_adds_none(tok: Tokenizer) -> None:
    expected = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    assert tok.apply_chat_template([{"role": "user", "content": "  spaced\n\n  {{ not jinja }} "}]) == (
        "<|im_start|>user\n  spaced\n\n  {{ not jinja }} <|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_append_only_across_turns(tok: Tokenizer) -> None:
    """prompt(N) + reply + "<|im_end|>\\n" tokens are a prefix of prompt(N+1): the decode state never
    has to be re-prefilled between turns."""
    replies = ["4", "Six. (3+3=6)", "Here is code:\n```python\nprint('hi')\n```", "中文回答 😀 done."]
    users = ["What is 2+2?", "And 3+3?", "Show me code", "Answer in Chinese"]
    messages: list[dict] = [{"role": "system", "content": "Be brief."}]
    for user, reply in zip(users, replies):
        messages.append({"role": "user", "content": user})
        prompt = tok.encode_chat(messages)
        messages.append({"role": "assistant", "content": reply})
        so_far = prompt + tok.encode(reply) + tok.encode("<|im_end|>\n")
        messages_next = [*messages, {"role": "user", "content": "next"}]
        following = tok.encode_chat(messages_next)
        assert following[: len(so_far)] == so_far
        assert so_far[-2:] == [IM_END, 198]


def test_kwargs_and_special_tokens_reach_template(tmp_path: Path) -> None:
    template = ("{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|"
                "{% for m in messages %}{{ m.role }}{% endfor %}")
    d = dolma2_dir(tmp_path, tokenizer_config__json={"chat_template": template, "bos_token": "<|endoftext|>",
                                                      "eos_token": {"content": "<|im_end|>"}})
    t = Tokenizer.from_dir(d)
    out = t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "a<b>&'"}])
    assert out == '<|endoftext|>|<|im_end|>|[{"name": "a<b>&\'"}]|4|user'


def test_tools_and_documents_default_to_none(tmp_path: Path) -> None:
    template = "{% if tools is not none %}T{{ tools | tojson }}{% endif %}{% if documents is none %}-{% endif %}"
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, chat_template__jinja=template))
    assert t.apply_chat_template(CONVERSATION) == "-"
    assert t.apply_chat_template(CONVERSATION, tools=[]) == "T[]-"


# -- chat template sources ------------------------------------------------------------------------


def test_tokenizer_config_template_used_over_builtin(tmp_path: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, tokenizer_config__json={"chat_template": template}))
    assert t.chat_template == template and not t.chat_template_is_builtin
    assert t.apply_chat_template(CONVERSATION) == "[user]What is 2+2?\n[assistant]4\n[user]And 3+3?\n"


def test_tokenizer_config_template_list_takes_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, tokenizer_config__json={"chat_template": templates}))
    assert t.chat_template == "DEFAULT"
    assert t.apply_chat_template(CONVERSATION) == "DEFAULT"


def test_chat_template_jinja_used_and_wins(tmp_path: Path) -> None:
    jinja = ("{%- for message in messages -%}\n"
             "  <{{ message.role }}>{{ message.content }}\n"
             "{% endfor -%}\n"
             "{%- if add_generation_prompt %}<assistant>{% endif %}")
    d = dolma2_dir(tmp_path, chat_template__jinja=jinja,
                   tokenizer_config__json={"chat_template": "FROM CONFIG"})
    t = Tokenizer.from_dir(d)
    assert t.chat_template == jinja
    assert t.apply_chat_template(CONVERSATION[:2]) == "<user>What is 2+2?\n<assistant>4\n<assistant>"


def test_generation_block_and_loop_controls(tmp_path: Path) -> None:
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% generation %}{{ m.content }};{% endgeneration %}{% endfor %}")
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, chat_template__jinja=template))
    assert t.apply_chat_template(CONVERSATION) == "What is 2+2?;4;"


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ ''.__class__ }}", "unsafe"),
    ("{{ messages.__class__.__init__.__globals__ }}", "unsafe"),
    ("{{ cycler.__init__.__globals__.os.system('echo pwned') }}", "unsafe"),
    ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),
    ("{% for m in messages %}{{ m.content }", "syntax error"),
    ("{% if %}", "syntax error"),
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    ("{{ 1 / 0 }}", "failed to render"),
    ("{{ undefined_thing.attr }}", "failed to render"),
])
def test_bad_templates_raise_olmo_error(tmp_path: Path, template: str, message: str) -> None:
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, chat_template__jinja=template))
    with pytest.raises(OlmoError, match=message) as info:
        t.apply_chat_template(CONVERSATION)
    assert "\n" not in str(info.value)


def test_raise_exception_message_is_kept(tmp_path: Path) -> None:
    d = dolma2_dir(tmp_path, chat_template__jinja="{{ raise_exception('Only user turns') }}")
    t = Tokenizer.from_dir(d)
    with pytest.raises(OlmoError) as info:
        t.apply_chat_template(CONVERSATION)
    assert str(info.value) == "Only user turns"


def test_bad_messages_raise_olmo_error(tok: Tokenizer) -> None:
    with pytest.raises(OlmoError):
        tok.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(OlmoError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(OlmoError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": None}])


# -- stop ids and config files --------------------------------------------------------------------


def test_stop_ids_from_generation_config_and_config(tmp_path: Path) -> None:
    d = dolma2_dir(tmp_path, generation_config__json={"eos_token_id": [100257, 100276], "pad_token_id": PAD},
                   config__json={"eos_token_id": 100275, "vocab_size": 100352})
    t = Tokenizer.from_dir(d)
    assert {IM_END, EOT, 100276, 100275} <= t.stop_ids
    assert PAD not in t.stop_ids
    assert isinstance(t.stop_ids, frozenset)


def test_stop_ids_from_int_generation_config(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(dolma2_dir(tmp_path, generation_config__json={"eos_token_id": 100276}))
    assert t.stop_ids == frozenset({IM_END, EOT, 100276})


@pytest.mark.parametrize("name", ["generation_config.json", "config.json", "tokenizer_config.json"])
def test_corrupt_json_files_raise_olmo_error(tmp_path: Path, name: str) -> None:
    d = dolma2_dir(tmp_path)
    (d / name).write_text('{"eos_token_id": [1, 2,', encoding="utf-8")
    with pytest.raises(OlmoError, match=name):
        Tokenizer.from_dir(d)


def test_bad_eos_value_raises_olmo_error(tmp_path: Path) -> None:
    with pytest.raises(OlmoError, match="eos_token_id"):
        Tokenizer.from_dir(dolma2_dir(tmp_path, generation_config__json={"eos_token_id": "<|im_end|>"}))


def test_missing_dir_raises_olmo_error(tmp_path: Path) -> None:
    with pytest.raises(OlmoError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_dir_without_tokenizer_raises_olmo_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OlmoError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(info.value) == f"no tokenizer.json or tokenizer.model in {tmp_path}"


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', "not json at all", '{"version": "1.0"}'])
def test_corrupt_tokenizer_json_raises_olmo_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(OlmoError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_sentencepiece_model_raises_olmo_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(OlmoError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


# -- incremental detokenizer -----------------------------------------------------------------------

LONG_TEXT = "".join(ROUND_TRIP) * 20 + "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400)) + "🦀" * 50


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.push(i) for i in ids] + [det.flush()]


def test_incremental_detokenizer_matches_decode(tok: Tokenizer) -> None:
    ids = tok.encode(LONG_TEXT)
    assert len(ids) > 3000
    pieces = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special=True) == LONG_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 100  # multi-byte characters split across tokens were held back


def test_incremental_detokenizer_decodes_short_windows(tok: Tokenizer) -> None:
    """Per token, only a few ids are decoded, however long the stream (no re-decoding everything)."""
    seen: list[int] = []
    decode = tok.decode

    class Spy:
        def decode(self, ids: list[int], skip_special: bool = False) -> str:
            seen.append(len(ids))
            return decode(ids, skip_special)

    ids = tok.encode(LONG_TEXT)
    det = IncrementalDetokenizer(Spy(), skip_special=True)  # type: ignore[arg-type]
    assert "".join(stream(det, ids)) == LONG_TEXT
    assert max(seen) <= 2 * IncrementalDetokenizer.MAX_HELD


def test_incremental_detokenizer_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 😀<|im_end|>\n<|im_start|>assistant\nok<|endoftext|>")
    skipped = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(skipped) == "Hi 😀\nassistant\nok"
    kept = stream(IncrementalDetokenizer(tok, skip_special=False), ids)
    assert "".join(kept) == tok.decode(ids)
    assert "<|im_end|>" in kept


def test_incremental_detokenizer_invalid_utf8_is_not_held_forever(tok: Tokenizer) -> None:
    first_half = tok.encode("😀")[:1]  # the first bytes of a 4-byte character
    det = IncrementalDetokenizer(tok)
    assert det.push(first_half[0]) == ""
    assert det.flush() == "\ufffd"
    det = IncrementalDetokenizer(tok)
    out = [det.push(first_half[0]) for _ in range(IncrementalDetokenizer.MAX_HELD)]
    assert out[-1].count("\ufffd") >= 1 and "".join(out[:-1]) == ""
    assert det.push(13347) == "Hi"


# -- sentencepiece-only model dir ------------------------------------------------------------------

SP_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model for testing the tokenizer, trained in a test.",
    "Olmo runs locally on one GPU with quantized weights.",
    "Hello world, hello there, general Kenobi!",
    "Numbers like 123 and 4567 appear too; so do commas, colons: and dashes - here.",
    "Streaming text arrives one token at a time, and the user reads it.",
]


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_LINES * 5), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # keep "\n" for chat prompts
    )
    return buf.getvalue()


def test_sentencepiece_only_dir(tmp_path: Path, sp_model: bytes) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    t = Tokenizer.from_dir(tmp_path)
    eos = t.token_to_id("</s>")
    assert eos is not None and eos in t.stop_ids
    assert t.token_to_id("no-such-piece") is None
    assert t.chat_template_is_builtin and t.eos_token == "</s>"
    for text in ["Hello world, the quick fox.", "Numbers 4567; ünïcödé 😀 中文 via byte fallback"]:
        ids = t.encode(text)
        assert ids and eos not in ids
        assert t.decode(ids) == text
        assert "".join(stream(IncrementalDetokenizer(t), ids)) == text
    ids = t.encode("Hello</s>world")
    assert ids.count(eos) == 1
    assert t.decode(ids) == "Hello</s>world"
    assert t.decode(ids, skip_special=True) == "Helloworld"
    prompt = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert t.decode(t.encode_chat([{"role": "user", "content": "Hi"}])) == prompt


def test_sentencepiece_added_tokens(tmp_path: Path, sp_model: bytes) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    n = Tokenizer.from_dir(tmp_path).vocab_size
    config = {"added_tokens_decoder": {str(n): {"content": "<|im_start|>", "special": True},
                                       str(n + 1): {"content": "<|im_end|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(tmp_path)
    assert t.vocab_size == n + 2
    assert n + 1 in t.stop_ids
    ids = t.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == n and ids.count(n) == 2 and ids.count(n + 1) == 1
    assert t.decode(ids, skip_special=True).split() == ["user", "Hello", "assistant"]
    assert "".join(stream(IncrementalDetokenizer(t, skip_special=False), ids)) == t.decode(ids)
