"""Tool calls as text: how tools reach the model, and how its reply is parsed back.

Framework-neutral (plain OpenAI-style dicts, no LangChain), so every adapter can share it.

Tools reach the model in one of two ways:

* the model's chat template renders `tools` itself (`template_supports_tools` renders a probe
  with and without a tool): tools, earlier calls and results go to the template as the usual
  OpenAI-style fields (`tools=`, `tool_calls`, role "tool");
* otherwise `inline_tools` adds a system prompt (`tools_system_prompt`) that lists the tools as
  JSON schemas and asks for Hermes-style calls, the format most open models are trained on:

      <tool_call>
      {"name": "get_weather", "arguments": {"location": "Paris"}}
      </tool_call>

  Earlier calls are written back into their assistant turns in that format, and tool results
  become user turns wrapped in `<tool_response>` tags, so templates that know only
  user/assistant/system still render the conversation.

`ToolCallParser` reads a reply, whole or delta by delta, into text and tool calls. It accepts
the Hermes tags anywhere in the reply, and a reply that is nothing but a JSON call (Llama 3's
`{"name": ..., "parameters": ...}`, Mistral's `[TOOL_CALLS] [...]`, a ```json fence).

Whatever the model writes, parsing yields text, `ToolCall`s and `InvalidToolCall`s and raises
nothing else: JSON nested deeper than `MAX_JSON_DEPTH` is refused before it reaches the
(recursive) JSON decoder, and so are non-finite numbers (`1e999`, `NaN`, `Infinity`), which
would otherwise come back as floats that serialise to invalid JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_engine import InvalidParamsError, LlamaEngine, LlamaError, check_messages

__all__ = [
    "MAX_JSON_DEPTH",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "InvalidToolCall",
    "ParsedPiece",
    "ToolCall",
    "ToolCallParser",
    "inline_tools",
    "loads_lenient",
    "new_call_id",
    "render_tool_call",
    "template_supports_tools",
    "tools_system_prompt",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_PROBE_TOOL = "llama_engine_probe_tool"
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects `loads_lenient` parses (far beyond any tool's
arguments, far below the decoder's recursion limit)."""


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """A call the model made: tool name and arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True, kw_only=True)
class InvalidToolCall:
    """Text that was meant as a tool call but does not parse; `error` says why."""

    text: str
    error: str
    name: str | None
    id: str


ParsedPiece = str | ToolCall | InvalidToolCall
"""What `ToolCallParser` yields: plain text, a tool call, or a call that failed to parse."""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_supports_tools(engine: LlamaEngine, **template_kwargs: Any) -> bool:
    """Whether the model's chat template (or `chat_template=`) renders `tools=`: a probe tool's
    name shows up in the prompt."""
    tool = {"type": "function", "function": {
        "name": _PROBE_TOOL, "description": "probe",
        "parameters": {"type": "object", "properties": {}}}}
    try:
        text = engine.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool],
                                          **template_kwargs)
    except LlamaError:
        return False
    return _PROBE_TOOL in text


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system prompt that offers `tools` (OpenAI tool dicts) to a model whose template
    cannot: the tools as JSON schemas, and the Hermes `<tool_call>` format to answer in."""
    listed = "\n".join(json.dumps(_function(t), ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You are provided with function signatures within "
        "<tools></tools> XML tags. You may call one or more functions to assist with the user "
        "query. Don't make assumptions about what values to plug into functions.\n"
        f"<tools>\n{listed}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "Function results come back inside <tool_response></tool_response> XML tags; use them "
        "to answer the user.")


def render_tool_call(name: str, arguments: Any) -> str:
    """An earlier call as the model would have written it. Raises InvalidParamsError when the
    arguments are not JSON (a non-finite number, an object of no JSON type, nesting too deep)."""
    try:
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidParamsError(
            f"the arguments of the earlier call to {name!r} are not JSON ({e}); pass finite "
            "numbers, strings, booleans, None, lists and dicts only") from None
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def inline_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Rewrite OpenAI-style messages (with `tool_calls` and role "tool") for a chat template that
    knows no tools: the tools become a system prompt, calls and results become plain text."""
    out: list[dict[str, Any]] = []
    for m in check_messages(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [render_tool_call(c["function"]["name"], c["function"]["arguments"])
                     for c in m["tool_calls"]]
            content = "\n".join([content, *calls] if content else calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):  # one user turn for consecutive results
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    return tool.get("function", tool) if tool.get("type", "function") == "function" else tool


# -- parsing ------------------------------------------------------------------------------------
class ToolCallParser:
    """Splits a reply, fed delta by delta, into text and tool calls.

    `feed(delta)` returns what is settled so far and holds back anything that may still turn
    into a call: a tail that could be the start of `<tool_call>`, the inside of an open call,
    and a reply that starts like a bare JSON call (held to the end). Whitespace between text and
    a call is dropped. `finish()` returns the rest; an unterminated call is parsed as it stands.
    `prefix` is text the caller already put in the model's mouth (e.g. an opened call).
    """

    def __init__(self, prefix: str = "") -> None:
        self._buf = ""
        self._in_call = False
        self._bare = False
        self._started = False  # any non-whitespace seen
        self._ws = ""  # whitespace held back: dropped if a call follows
        self._after_call = False
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
            stripped = self._buf.lstrip()
            if not stripped or (len(stripped) < 7 and "```json".startswith(stripped)):
                return out  # too early to tell text from a fenced call
            self._started = True
            if _looks_like_bare_json(stripped):
                self._bare = True
                return out
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                out.append(self._parse_call(self._buf[:end]))
                self._buf = self._buf[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                continue
            start = self._buf.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._emit_text(self._buf[:start], out)
                self._ws = ""
                self._buf = self._buf[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, TOOL_CALL_OPEN)
            self._emit_text(self._buf[: len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return out

    def finish(self) -> list[ParsedPiece]:
        out: list[ParsedPiece] = []
        if self._bare:
            calls = _parse_bare(self._buf)
            if calls is not None:
                self.calls += len(calls)
                return list(calls)
            return [self._buf] if self._buf else []
        if self._in_call:
            out.append(self._parse_call(self._buf))
        else:
            self._emit_text(self._buf, out)
            if self._ws and not self.calls:
                out.append(self._ws)
        self._buf = self._ws = ""
        return out

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

    def _parse_call(self, body: str) -> ToolCall | InvalidToolCall:
        self.calls += 1
        self._after_call = True
        return parse_call(body)


def parse_call(body: str) -> ToolCall | InvalidToolCall:
    """One call from the JSON text inside `<tool_call>` tags."""
    text = _strip_fence(body.strip())
    try:
        obj = loads_lenient(text)
    except ValueError as e:
        return InvalidToolCall(text=body, error=f"not JSON: {e}", name=None, id=new_call_id())
    return _call_from_obj(obj, body)


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


def _parse_bare(text: str) -> list[ToolCall | InvalidToolCall] | None:
    body = text.strip()
    if body.startswith("[TOOL_CALLS]"):
        body = body[len("[TOOL_CALLS]"):].strip()
    body = _strip_fence(body)
    try:
        obj = loads_lenient(body)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    if not items or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                            for i in items):
        return None
    calls = [_call_from_obj(i, json.dumps(i, ensure_ascii=False)) for i in items]
    return calls if all(isinstance(c, ToolCall) for c in calls) else None


def _looks_like_bare_json(text: str) -> bool:
    return text[0] in "{[" or text.startswith("```json")


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
