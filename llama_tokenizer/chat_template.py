"""Chat templates: the Jinja programs that turn OpenAI-style messages into a prompt string.

Rendered the way HF transformers renders them (its `apply_chat_template` is the reference for
every template on the Hub): a sandboxed, immutable Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a no-op `{% generation %}` tag, the globals
`raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses dunder names, and a
`tojson` filter that keeps non-ASCII text as is. Templates are untrusted code: the sandbox plus
`_plain` (which rebuilds every input from plain JSON types) keep them from reaching Python objects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_engine.errors import ConfigError, InvalidParamsError

__all__ = ["ChatTemplate", "compile_chat_template"]


def _raise_exception(message: object) -> NoReturn:
    raise InvalidParamsError(
        f"the chat template rejected the conversation: {message}; "
        "fix the messages (roles, their order, the fields the template expects)"
    )


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore-prefixed attribute names."""

    def __init__(
        *args: Any, **kwargs: Any
    ) -> None:  # Jinja's own signature trick: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise InvalidParamsError(
                f"the chat template tried to store {name!r} on a namespace; names starting with "
                "'_' are refused, so fix the template or pass chat_template="
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja reads a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types; anything else becomes a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())  # pydantic models
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled chat template. Thread-safe: rendering shares no state between calls."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(
                f"a chat template must be a non-empty Jinja string, got {source!r}; "
                "pass the template text as chat_template="
            )
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"the chat template does not compile: {e.message} (line {e.lineno}); "
                "fix the template or pass a working one as chat_template="
            ) from e

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt for `messages`; `variables` (bos_token, documents, ...) reach the template."""
        _check_messages(messages)
        if tools is not None and (
            isinstance(tools, Mapping | str) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidParamsError(
                f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}; "
                'pass e.g. [{"type": "function", "function": {"name": ..., "parameters": ...}}]'
            )
        context = {k: _plain(v) for k, v in variables.items()}
        context.setdefault("documents", None)
        try:
            return self._template.render(
                messages=_plain(list(messages)),
                tools=_plain(list(tools)) if tools is not None else None,
                add_generation_prompt=bool(add_generation_prompt),
                **context,
            )
        except jinja2.TemplateError as e:
            raise InvalidParamsError(
                f"rendering the chat template failed: {e}; check the messages against what "
                "the template expects, or pass a different chat_template="
            ) from e


def _check_messages(messages: object) -> None:
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidParamsError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}; for a raw prompt call generate() instead"
        )
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidParamsError(
                f"message {n} must be a dict with a string 'role', got {m!r}; "
                "write messages as {'role': 'user', 'content': '...'}"
            )


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> ChatTemplate:
    """A compiled template for `source`, cached: each distinct template compiles once."""
    return ChatTemplate(source)
