"""Tool calls as the model writes them, read back into `ToolCall`s.

`ToolCallParser` splits a reply, whole or delta by delta, into text and calls. It accepts
Hermes-style calls anywhere in the reply, the format most open models are trained on and the
one `llama_engine.tools` asks for:

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

and a reply that is nothing but a JSON call (Llama 3's `{"name": ..., "parameters": ...}`,
Mistral's `[TOOL_CALLS] [...]`, a ```json fence). `<tool_response>` tags a model copies from
the conversation into its answer are dropped (their text is kept).

Whatever the model writes, parsing yields text, `ToolCall`s and `InvalidToolCall`s and raises
nothing: JSON nested deeper than `MAX_JSON_DEPTH` is refused before it reaches the (recursive)
JSON decoder, and so are non-finite numbers (`1e999`, `NaN`, `Infinity`), which would
otherwise come back as floats that serialise to invalid JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Collection
from typing import Any

from llama_engine.errors import InvalidParamsError
from llama_engine.types import InvalidToolCall, ToolCall

__all__ = [
    "MAX_JSON_DEPTH",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedPiece",
    "ToolCallParser",
    "loads_lenient",
    "new_call_id",
    "parse_call",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects `loads_lenient` parses (far beyond any tool's
arguments, far below the decoder's recursion limit)."""

ParsedPiece = str | ToolCall | InvalidToolCall
"""What `ToolCallParser` yields: plain text, a tool call, or a call that failed to parse."""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Splits a reply, fed delta by delta, into text and tool calls.

    `feed(delta)` returns what is settled so far and holds back anything that may still turn
    into a call: a tail that could be the start of `<tool_call>`, the inside of an open call,
    and a reply that starts like a bare JSON call (held to the end). Whitespace between text and
    a call is dropped. `finish()` returns the rest; an unterminated call is parsed as it stands.
    `prefix` is text the caller already put in the model's mouth (e.g. an opened call).
    """

    def __init__(self, prefix: str = "", names: Collection[str] | None = None) -> None:
        """`names`: the tools offered; a reply that is only a JSON call counts as a call only
        if it names one of them (with any name when None)."""
        self._names = None if names is None else frozenset(names)
        self._buf = ""
        self._in_call = False
        self._bare = False
        self._started = False  # any non-whitespace seen
        self._ws = ""  # whitespace held back: dropped if a call follows
        self._after_call = False
        self._echoed = False
        self.calls = 0
        if prefix:
            rest = self.feed(prefix)
            assert not rest, "a prefix must not produce output by itself"

    def feed(self, delta: str) -> list[ParsedPiece]:
        out: list[ParsedPiece] = []
        self._buf += delta
        if self._bare:
            return out
        if not self._started:
            bare = _bare_start(self._buf)
            if bare is None:
                return out  # too early to tell text from a bare call
            self._started = True
            if bare:
                self._bare = True
                return out
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                body = self._buf[:end]
                out.append(self._parse_call(body, TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE))
                self._buf = self._buf[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                continue
            self._drop_echoes()
            start = self._buf.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._emit_text(self._buf[:start], out)
                self._ws = ""
                self._buf = self._buf[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            keep = max(_partial_suffix(self._buf, m) for m in (TOOL_CALL_OPEN, *_ECHOES))
            keep = max([keep] + [len(t) for t in _ECHOES if self._buf.endswith(t)])
            self._emit_text(self._buf[: len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return out

    def finish(self, *, cut_off: bool = False) -> list[ParsedPiece]:
        """The rest of the reply. An unterminated call is parsed as it stands (leniently), or,
        if the reply was `cut_off` by max_tokens, kept only if its JSON is complete."""
        out: list[ParsedPiece] = []
        if self._bare:
            calls = _parse_bare(self._buf, self._names) if not cut_off else None
            if calls is not None:
                self.calls += len(calls)
                return list(calls)
            return [self._buf] if self._buf else []
        if self._in_call:
            raw = TOOL_CALL_OPEN + self._buf
            out.append(self._parse_call(self._buf, raw) if not cut_off
                       else self._complete_call(self._buf, raw))
        else:
            self._drop_echoes(final=True)
            self._emit_text(self._buf, out)
            if self._ws and not (self.calls or self._echoed):
                out.append(self._ws)
        self._buf = self._ws = ""
        return out

    def _drop_echoes(self, *, final: bool = False) -> None:
        """Drop copied `<tool_response>` tags (and the newline beside each) from the text; a
        tag at the very end waits for what follows it (a newline to drop with it)."""
        tail = next((t for t in _ECHOES if not final and self._buf.endswith(t)), "")
        body = self._buf[: len(self._buf) - len(tail)]
        if any(t in body for t in _ECHOES):
            body, self._echoed = _without_echoes(body), True
        self._buf = body + tail

    def _emit_text(self, text: str, out: list[ParsedPiece]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if body:
            out.append(self._ws + body)
            self._ws = ""
        self._ws += text[len(body):]

    def _complete_call(self, body: str, raw: str) -> ToolCall | InvalidToolCall:
        """A call in a reply cut off by max_tokens: kept if its JSON is complete (a partial
        closing tag aside), else an InvalidToolCall saying it was cut."""
        body = body.rstrip()
        body = body[: len(body) - _partial_suffix(body, TOOL_CALL_CLOSE)]
        try:
            _decode(body.strip())  # complete, strictly
        except ValueError:
            self._after_call = True
            return InvalidToolCall(
                text=raw, name=None, id=new_call_id(),
                error="the reply reached max_tokens inside this call; raise max_tokens")
        return self._parse_call(body, raw)

    def _parse_call(self, body: str, raw: str) -> ToolCall | InvalidToolCall:
        self._after_call = True
        call = parse_call(body, raw)
        self.calls += isinstance(call, ToolCall)
        return call


def parse_call(body: str, raw: str | None = None) -> ToolCall | InvalidToolCall:
    """One call from the JSON text inside `<tool_call>` tags; `raw` is the text as written
    (tags included), kept in an InvalidToolCall."""
    text = _strip_fence(body.strip())
    try:
        obj = loads_lenient(text)
    except ValueError as e:
        return InvalidToolCall(text=raw if raw is not None else body, error=f"not JSON: {e}",
                               name=None, id=new_call_id())
    return _call_from_obj(obj, raw if raw is not None else body)


def _call_from_obj(obj: Any, raw: str) -> ToolCall | InvalidToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return InvalidToolCall(text=raw, error='expected {"name": ..., "arguments": {...}}',
                               name=None, id=new_call_id())
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        with contextlib.suppress(ValueError):
            args = loads_lenient(args) if args.strip() else {}
    if not isinstance(args, dict):
        return InvalidToolCall(text=raw, error="the arguments are not a JSON object",
                               name=obj["name"], id=new_call_id())
    return ToolCall(name=obj["name"], arguments=args, id=new_call_id())


def _parse_bare(text: str, names: frozenset[str] | None) -> list[ToolCall | InvalidToolCall] | None:
    """The calls of a reply that is only JSON, or None (it is text): every item must be an
    object naming an offered tool (`names`, any when None) with `arguments` or `parameters`,
    and nothing but whitespace may follow the JSON."""
    body = text.strip()
    if body.startswith("[TOOL_CALLS]"):
        body = body[len("[TOOL_CALLS]"):].strip()
    body = _strip_fence(body)
    try:
        obj = _decode(body)
    except json.JSONDecodeError:
        try:  # cut off at the end: close it
            obj = _decode(_close_open_json(body))
        except ValueError:
            return None
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    if not items or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str)
            and ("arguments" in i or "parameters" in i)
            and (names is None or i["name"] in names) for i in items):
        return None
    calls = [_call_from_obj(i, json.dumps(i, ensure_ascii=False)) for i in items]
    return calls if all(isinstance(c, ToolCall) for c in calls) else None


_BARE_STARTS = ('{"name"', '[{"name"', "[TOOL_CALLS]", "```json")


def _bare_start(text: str) -> bool | None:
    """Whether a reply starting with `text` may be a bare JSON call (None: too early to tell):
    it opens like one of `_BARE_STARTS`, whitespace aside."""
    compact = "".join(text.split())[:16]
    if not compact:
        return None
    if any(compact.startswith(s) for s in _BARE_STARTS):
        return True
    if any(s.startswith(compact) for s in _BARE_STARTS):
        return None
    return False


def _strip_fence(text: str) -> str:
    """The inside of a ``` or ```json fence (the closing fence may be missing). Plain string
    operations: a regex with a lazy group here backtracks quadratically on long whitespace."""
    if not text.startswith("```"):
        return text
    body = text[3:]
    if body.startswith("json"):
        body = body[4:]
    body = body.strip()
    if body.endswith("```"):
        body = body[:-3].rstrip()
    return body


_ECHOES = ("<tool_response>", "</tool_response>")
"""Tags a model copies from the conversation around a tool's result; it never writes a result
itself, so they are dropped from its reply (the text inside is kept)."""


def _without_echoes(text: str) -> str:
    for tag in _ECHOES:
        text = text.replace(f"{tag}\n", "").replace(f"\n{tag}", "").replace(tag, "")
    return text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def loads_lenient(text: str) -> Any:
    """`json.loads`, forgiving what small models get wrong at the end: trailing text after the
    value, and a value cut off before its closing quotes and brackets.

    Strict where JSON is: non-finite numbers (`1e999`, `NaN`, `Infinity`) and nesting deeper
    than `MAX_JSON_DEPTH` are refused. Raises InvalidParamsError (a ValueError), nothing else.
    """
    text = text.strip()
    try:
        return _decode(text)
    except json.JSONDecodeError:
        pass
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise InvalidParamsError(f"no JSON value in {text[:80]!r}")
    text = text[start:]
    try:
        return _decode(text, raw=True)
    except json.JSONDecodeError:
        pass
    try:
        return _decode(_close_open_json(text))
    except json.JSONDecodeError as e:
        raise InvalidParamsError(f"not valid JSON: {e}") from None


def _decode(text: str, *, raw: bool = False) -> Any:
    """One JSON value (with `raw`, the value at the start of `text`, ignoring what follows).
    The nesting is measured first, on the whole text, which bounds what the decoder sees."""
    depth = _scan(text)[0]
    if depth > MAX_JSON_DEPTH:
        raise InvalidParamsError(
            f"JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed; tool "
            "arguments must be flatter")
    try:
        return _DECODER.raw_decode(text)[0] if raw else _DECODER.decode(text)
    except RecursionError:  # unreachable given the depth check; belt and braces
        raise InvalidParamsError("JSON nested too deep to parse") from None
    except ValueError as e:  # JSONDecodeError passes on (the caller tries the next repair)
        if isinstance(e, json.JSONDecodeError | InvalidParamsError):
            raise
        raise InvalidParamsError(f"not valid JSON: {e}") from None  # e.g. a 5000-digit int


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidParamsError(
            f"the number {text[:40]} is out of range (JSON numbers must be finite)")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidParamsError(f"{name} is not JSON (JSON numbers must be finite)")


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def _scan(text: str) -> tuple[int, list[str], bool]:
    """(deepest nesting, closers still open, inside a string at the end) of JSON-ish text."""
    stack: list[str] = []
    deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            deepest = max(deepest, len(stack))
        elif ch in "}]" and stack:
            stack.pop()
    return deepest, stack, in_string


def _close_open_json(text: str) -> str:
    _, stack, in_string = _scan(text)
    tail = '"' if in_string else ""
    body = (text + tail).rstrip().rstrip(",")
    return body + "".join(reversed(stack))
