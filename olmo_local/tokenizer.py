"""Tokenizer, chat template and stop tokens of a model directory, and a streaming detokenizer.

`Tokenizer.from_dir(path)` reads what a Hugging Face model repo ships:

- `tokenizer.json` (through the `tokenizers` library), or, if absent, a sentencepiece
  `tokenizer.model` (extra tokens from `tokenizer_config.json` "added_tokens_decoder" and
  `added_tokens.json` are honoured);
- the chat template: `chat_template.jinja`, else `tokenizer_config.json` "chat_template" (a string, or
  a list of `{name, template}` from which "default" is taken), else `chat_template.json`, else the
  built-in Olmo ChatML template (`olmo_local.chat_template.BUILTIN_CHAT_TEMPLATE`, which adds no
  default system turn). As in transformers, `chat_template.jinja` wins over tokenizer_config.json;
- the stop ids: `eos_token_id` (int or list) of `config.json` and `generation_config.json`, the id of
  tokenizer_config.json's `eos_token` (or sentencepiece's `</s>`), and `<|im_end|>` and
  `<|endoftext|>` whenever the vocabulary has them (spec §7 / P11: Olmo stops on 100265 and 100257).

`encode` recognises special tokens written in the text and never adds a BOS (Olmo has none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from olmo_local.chat_template import BUILTIN_CHAT_TEMPLATE, render_chat_template
from olmo_local.errors import OlmoError

# Tokens Olmo's chat format ends a turn with; added to the stop ids whenever the vocabulary has them.
CHAT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None if the file is absent; OlmoError if it is unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OlmoError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); "
                        "re-download the model files") from None
    except (OSError, UnicodeDecodeError) as err:
        raise OlmoError(f"cannot read {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise OlmoError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OlmoError(f"cannot read {path}: {_one_line(err)}") from None


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _eos_ids(value: Any, source: Path) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise OlmoError(f"{source}: eos_token_id must be a token id or a list of token ids, not {value!r}")
    return set(values)


# ---------------------------------------------------------------------------------------------------
# Backends: the `tokenizers` library (tokenizer.json) and sentencepiece (tokenizer.model).


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the library raises bare Exception
            _read_json(path)  # a JSON error gives the clearer message
            raise OlmoError(f"{path} is not a valid tokenizer.json ({_one_line(err)}); "
                            "re-download the model files") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def default_special_tokens(self) -> tuple[str | None, str | None]:
        return None, ("<|endoftext|>" if self.token_to_id("<|endoftext|>") is not None else None)


class _SPBackend:
    """A sentencepiece model plus the added tokens a repo declares in JSON.

    sentencepiece itself never reads control symbols (`<s>`, `</s>`) out of text, so the text is split
    on them (and on added tokens) first, longest match first, as Hugging Face tokenizers do.
    """

    def __init__(self, path: Path, tokenizer_config: dict, added_tokens: dict | None):
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as err:  # noqa: BLE001 - RuntimeError/OSError from the C++ side
            raise OlmoError(f"{path} is not a valid sentencepiece model ({_one_line(err)}); "
                            "re-download the model files") from None
        self._sp = sp
        n = sp.get_piece_size()
        self._text_to_id: dict[str, int] = {}  # tokens matched in text before sentencepiece runs
        self._special_ids: set[int] = set()  # dropped by decode(skip_special=True)
        self._id_to_text: dict[int, str] = {}  # ids decoded as their literal text
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                piece = sp.id_to_piece(i)
                self._text_to_id[piece] = i
                self._special_ids.add(i)
                self._id_to_text[i] = piece
        declared: list[tuple[int, str, bool]] = []
        for key, info in (tokenizer_config.get("added_tokens_decoder") or {}).items():
            content = _token_string(info)
            if content is not None and str(key).isdigit():
                special = bool(info.get("special", True)) if isinstance(info, dict) else True
                declared.append((int(key), content, special))
        for content, i in (added_tokens or {}).items():
            if isinstance(i, int) and not any(d[0] == i for d in declared):
                declared.append((i, content, True))
        for i, content, special in declared:
            self._text_to_id[content] = i
            if i >= n or sp.id_to_piece(i) != content or special:
                self._id_to_text[i] = content
            if special:
                self._special_ids.add(i)
        self.vocab_size = max([n] + [i + 1 for i in self._id_to_text])
        tokens = sorted(self._text_to_id, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.encode(text, out_type=int)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._text_to_id[part])
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        n = self._sp.get_piece_size()
        for i in ids:
            if i in self._id_to_text:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not (skip_special and i in self._special_ids):
                    out.append(self._id_to_text[i])
            elif 0 <= i < n:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._text_to_id:
            return self._text_to_id[token]
        i = self._sp.piece_to_id(token)
        return None if self._sp.is_unknown(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._id_to_text:
            return self._id_to_text[token_id]
        if 0 <= token_id < self._sp.get_piece_size():
            return self._sp.id_to_piece(token_id)
        return None

    def default_special_tokens(self) -> tuple[str | None, str | None]:
        sp = self._sp
        bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        return bos, eos


# ---------------------------------------------------------------------------------------------------


def _chat_template_from(directory: Path, tokenizer_config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file)
    source = directory / "tokenizer_config.json"
    template = tokenizer_config.get("chat_template")
    if template is None:
        source = directory / "chat_template.json"
        template = (_read_json(source) or {}).get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and template and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        by_name = {t.get("name"): t["template"] for t in template}
        return by_name.get("default", template[0]["template"])
    raise OlmoError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


class Tokenizer:
    """Text <-> token ids, the chat template and the stop ids of one model directory."""

    def __init__(self, backend: _HFBackend | _SPBackend, *, chat_template: str | None = None,
                 stop_ids: Iterable[int] = (), bos_token: str | None = None,
                 eos_token: str | None = None):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        #: True when the repo ships no template and the built-in Olmo ChatML one is used.
        self.chat_template_is_builtin: bool = chat_template is None
        self.chat_template: str = BUILTIN_CHAT_TEMPLATE if chat_template is None else chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        ids = set(stop_ids)
        for token in CHAT_STOP_TOKENS + ((eos_token,) if eos_token else ()):
            token_id = backend.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        self.stop_ids: frozenset[int] = frozenset(ids)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a model directory (see the module docstring for what is read)."""
        directory = Path(path).expanduser()
        if directory.is_file():
            directory = directory.parent
        if not directory.is_dir():
            raise OlmoError(f"tokenizer directory {directory} does not exist")
        tokenizer_config = _read_json(directory / "tokenizer_config.json") or {}
        if (directory / "tokenizer.json").is_file():
            backend: _HFBackend | _SPBackend = _HFBackend(directory / "tokenizer.json")
        elif (directory / "tokenizer.model").is_file():
            backend = _SPBackend(directory / "tokenizer.model", tokenizer_config,
                                 _read_json(directory / "added_tokens.json"))
        else:
            raise OlmoError(f"no tokenizer.json or tokenizer.model in {directory}")

        default_bos, default_eos = backend.default_special_tokens()
        bos, eos = default_bos, default_eos
        if "bos_token" in tokenizer_config:
            bos = _token_string(tokenizer_config["bos_token"])
        if "eos_token" in tokenizer_config:
            eos = _token_string(tokenizer_config["eos_token"])

        stop_ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            cfg = _read_json(directory / name)
            if cfg is None:
                continue
            stop_ids |= _eos_ids(cfg.get("eos_token_id"), directory / name)
            text_config = cfg.get("text_config")
            if isinstance(text_config, dict):
                stop_ids |= _eos_ids(text_config.get("eos_token_id"), directory / name)

        return cls(backend, chat_template=_chat_template_from(directory, tokenizer_config),
                   stop_ids=stop_ids, bos_token=bos, eos_token=eos)

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are recognised; no BOS is added."""
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) decodes as U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the chat template, in a sandbox.

        `kwargs` (tools, enable_thinking, ...) are passed to the template and override bos_token /
        eos_token. Any template failure is an OlmoError.
        """
        # transformers always passes tools and documents (None when absent); templates test `is none`.
        variables: dict[str, Any] = {"tools": None, "documents": None}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(kwargs)
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """`encode(apply_chat_template(messages, add_generation_prompt))`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_").replace("Backend", "")
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, stop_ids={sorted(self.stop_ids)})"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, as vLLM / TGI do.

    Two offsets into the ids seen so far: text up to `read` has been emitted; `prefix` is where the
    previous emission started. Decoding `ids[prefix:]` and removing the text of `ids[prefix:read]`
    gives the new text with the spacing a decoder derives from context, so only that short window is
    decoded per token; ids before `prefix` are dropped (which keeps `prefix` at 0 here). New text is
    held back while it is empty (e.g. a skipped special token) or ends with U+FFFD (a multi-byte
    character cut between tokens), for at most `MAX_HELD` tokens; after that it is emitted as is (the
    model really produced invalid UTF-8). `flush()` emits whatever is held.
    """

    MAX_HELD = 8  # a UTF-8 character is at most 4 bytes, so valid text never needs more

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []  # the window: ids[:read] were emitted (context), ids[read:] are held
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; returns the new printable text (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[:self._read], self._skip)
        new_text = self._tok.decode(self._ids, self._skip)
        held = len(self._ids) - self._read
        if held < self.MAX_HELD and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        return self._advance(prefix_text, new_text)

    def flush(self) -> str:
        """Emit all text still held back (e.g. at the end of generation)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[:self._read], self._skip)
        return self._advance(prefix_text, self._tok.decode(self._ids, self._skip))

    def _advance(self, prefix_text: str, new_text: str) -> str:
        # The tokens just emitted become the context of the next decode; older ones are dropped.
        del self._ids[:self._read]
        self._read = len(self._ids)
        return new_text[len(prefix_text):]


__all__ = ["CHAT_STOP_TOKENS", "IncrementalDetokenizer", "Tokenizer"]
