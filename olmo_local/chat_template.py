"""Chat templates: the built-in Olmo ChatML template and a sandboxed Jinja renderer.

A chat template comes from the model repo, so it is untrusted input. It is rendered in jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks` (as transformers does), with
the helpers Hugging Face templates expect: `raise_exception(msg)`, a `tojson` filter that does not
HTML-escape, `strftime_now(fmt)`, the `loopcontrols` extension (`{% break %}`, `{% continue %}`) and
a no-op `{% generation %}` block. Every failure (syntax error, unsafe attribute access, a template
calling `raise_exception`, a render error) becomes an `OlmoError` with a one-line message.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from olmo_local.errors import OlmoError

# Olmo ChatML (spec §7): each turn `<|im_start|>{role}\n{content}<|im_end|>\n`, and
# `add_generation_prompt` appends `<|im_start|>assistant\n`. Unlike the Olmo-3 instruct templates it
# adds NO default system turn: with no system message the prompt starts at the first user turn.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('message ' ~ loop.index ~ ' (role ' ~ message['role'] ~ ') has no text content') }}"
    "{% endif %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _raise_exception(message: str) -> None:
    raise OlmoError(_one_line(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes (<, >, &, '), which would change prompts; transformers' doesn't.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that prints as "" and fails only when used further;
        # fail at once so that any attempt to reach outside the sandbox is an error.
        kind = type(obj).__name__
        raise SecurityError(f"access to attribute {attribute!r} of a {kind} object is unsafe")


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox; a syntax error becomes OlmoError."""
    if not isinstance(source, str):
        raise OlmoError(f"chat template must be a string, not {type(source).__name__}")
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise OlmoError(f"chat template has a syntax error at line {err.lineno}: "
                        f"{_one_line(err.message)}") from None
    except Exception as err:  # noqa: BLE001 - any compile failure is a bad template
        raise OlmoError(f"chat template cannot be compiled: {_one_line(err)}") from None


def _check_messages(messages: Any) -> list:
    if not isinstance(messages, (list, tuple)):
        raise OlmoError(f"chat messages must be a list of dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, Mapping):
            raise OlmoError(f"chat message {i} must be a dict with 'role' and 'content', "
                            f"not {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise OlmoError(f"chat message {i} has no 'role' string")
    return list(messages)


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render `source` for `messages`. `variables` (bos_token, eos_token, tools, ...) reach the template."""
    template = compile_template(source)
    messages = _check_messages(messages)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except OlmoError:
        raise
    except SecurityError as err:
        raise OlmoError(f"chat template tried an unsafe operation: {_one_line(err)}") from None
    except jinja2.TemplateSyntaxError as err:
        raise OlmoError(f"chat template has a syntax error at line {err.lineno}: "
                        f"{_one_line(err.message)}") from None
    except Exception as err:  # noqa: BLE001 - a template is data; its failures are the user's to fix
        raise OlmoError(f"chat template failed to render: {type(err).__name__}: {_one_line(err)}") from None


__all__ = ["BUILTIN_CHAT_TEMPLATE", "compile_template", "render_chat_template"]
