"""Chat templates: the Jinja programs that turn OpenAI-style messages into a prompt string.

Rendered the way HF transformers renders them (its `apply_chat_template` is the reference for
every template on the Hub): a sandboxed, immutable Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a no-op `{% generation %}` tag, the globals
`raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses dunder names, and a
`tojson` filter that keeps non-ASCII text as is. Templates are untrusted code: the sandbox plus
`_plain` (which rebuilds every input from plain JSON types) keep them from reaching Python objects,
and `_template_bounds` keeps them within a time limit and bounds on loop iterations, recursion,
value sizes, integer sizes, memory and output (its docstring lists the limits); here, `tojson`
indents and separators are bounded by _MAX_JSON_INDENT (64) characters and `strftime_now` formats
by _MAX_STRFTIME_FORMAT (1024). Any failure while compiling is a `ConfigError`, any failure while
rendering an `InvalidParamsError`.

Messages use OpenAI's shape, checked by `llama_engine.messages.check_messages` (content parts
are joined into one string before the template sees them).
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

from llama_engine.errors import ConfigError, InvalidParamsError, LlamaError
from llama_engine.messages import check_messages
from llama_tokenizer._template_bounds import (
    MAX_INPUT_ITEMS,
    MAX_NESTING,
    MAX_TEMPLATE_CHARS,
    MAX_TEMPLATE_TOKENS,
    BoundedEnvironment,
    InputStats,
    check_stored,
    limit_error,
    render_bounded,
)

__all__ = ["ChatTemplate", "compile_chat_template"]


_MAX_JSON_INDENT = 64
_MAX_STRFTIME_FORMAT = 1024


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _raise_exception(message: object) -> NoReturn:
    raise InvalidParamsError(
        f"the chat template rejected the conversation: {_clip(str(message))}; "
        "fix the messages (roles, their order, the fields the template expects)"
    )


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    pads = [indent, *(separators or ())]
    widths = [len(p) if isinstance(p, str) else p for p in pads if isinstance(p, str | int)]
    if any(w > _MAX_JSON_INDENT for w in widths):
        raise limit_error(
            f"asked tojson for an indent or separator over {_MAX_JSON_INDENT} characters"
        )
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    if isinstance(fmt, str) and len(fmt) > _MAX_STRFTIME_FORMAT:
        raise limit_error(
            f"passed strftime_now a format of {len(fmt):,} characters (the limit is "
            f"{_MAX_STRFTIME_FORMAT:,})"
        )
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
        check_stored(value)
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


def _environment() -> BoundedEnvironment:
    env = BoundedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.seal()
    return env


def _plain(value: Any, stats: InputStats, depth: int = 0) -> Any:
    """`value` rebuilt from plain JSON types; anything else becomes a "<TypeName>" placeholder.

    Counts what it rebuilds into `stats`, and refuses inputs too large or too deeply nested to
    hand to a template.
    """
    stats.items += 1
    if stats.items > MAX_INPUT_ITEMS:
        raise InvalidParamsError(
            f"the messages, tools and template variables hold more than {MAX_INPUT_ITEMS:,} "
            "values together; send a shorter conversation or fewer tools"
        )
    if depth > MAX_NESTING:
        raise InvalidParamsError(
            f"the messages, tools or template variables are nested more than {MAX_NESTING} "
            "levels deep; flatten them (tool schemas and messages are plain JSON)"
        )
    if value is None or type(value) in (int, float, bool):
        return value
    if isinstance(value, str):
        stats.chars += len(value)
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, stats, depth + 1): _plain(v, stats, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, stats, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, stats, depth + 1) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item(), stats, depth)  # numpy scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: _plain(getattr(value, f.name), stats, depth + 1) for f in fields}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(), stats, depth)  # pydantic models
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled chat template. Thread-safe: rendering shares no state between calls."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(
                f"a chat template must be a non-empty Jinja string, got {_clip(repr(source))}; "
                "pass the template text as chat_template="
            )
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ConfigError(
                f"the chat template is {len(source):,} characters long, over the limit of "
                f"{MAX_TEMPLATE_CHARS:,}; pass a shorter template as chat_template="
            )
        self.source = source
        try:
            env = _environment()
            if env.count_tokens(source, MAX_TEMPLATE_TOKENS) > MAX_TEMPLATE_TOKENS:
                raise ConfigError(
                    f"the chat template has more than {MAX_TEMPLATE_TOKENS:,} Jinja tokens, over "
                    "the limit; pass a shorter template as chat_template="
                )
            self._template = env.compile_bounded(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"the chat template does not compile: {_clip(str(e.message))} (line {e.lineno}); "
                "fix the template or pass a working one as chat_template="
            ) from e
        except LlamaError:
            raise
        except Exception as e:  # too deeply nested for the parser or for Python, and the like
            raise ConfigError(
                f"the chat template does not compile: {type(e).__name__}: {_clip(str(e))}; "
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
        messages = check_messages(messages)
        if tools is not None and (
            isinstance(tools, Mapping | str) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidParamsError(
                f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}; "
                'pass e.g. [{"type": "function", "function": {"name": ..., "parameters": ...}}]'
            )
        stats = InputStats()
        context = {k: _plain(v, stats) for k, v in variables.items()}
        context.setdefault("documents", None)
        context["messages"] = _plain(messages, stats)
        context["tools"] = _plain(list(tools), stats) if tools is not None else None
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return render_bounded(self._template, context, stats)
        except LlamaError:
            raise
        except RecursionError as e:
            raise limit_error("recursed deeper than Python allows") from e
        except MemoryError as e:
            raise limit_error("ran out of memory") from e
        except Exception as e:  # TemplateError, TypeError, ValueError, OverflowError, ...
            what = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise InvalidParamsError(
                f"rendering the chat template failed: {_clip(what)}; check the messages against "
                "what the template expects, or pass a different chat_template="
            ) from e


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> ChatTemplate:
    """A compiled template for `source`, cached: each distinct template compiles once."""
    return ChatTemplate(source)
