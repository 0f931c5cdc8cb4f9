"""Tool-call parsing on hostile input: whatever a model writes, the result is text, a `ToolCall`
or an `InvalidToolCall` (or a typed `LlamaError`), never a RecursionError, a hang, or JSON with
`Infinity` in it. (Hostile tool schemas: tests/llama_runtime/test_tool_calling.py.)"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from llama_engine import InvalidParamsError, InvalidToolCall, ToolCall
from llama_engine.tool_calls import MAX_JSON_DEPTH, ToolCallParser, loads_lenient, parse_call
from llama_engine.tools import render_tool_call


def _parse(text: str, chunks: int = 1) -> list[Any]:
    parser = ToolCallParser()
    step = max(1, len(text) // chunks)
    out: list[Any] = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i:i + step])
    return out + parser.finish()


def _strict(value: Any) -> None:
    """`value` serialises as strict JSON (no NaN/Infinity) and parses back to itself."""
    assert json.loads(json.dumps(value, allow_nan=False)) == value


# -- the parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reply", [
    "[" * 1000,  # a bare JSON-looking reply
    "{" * 1000,
    "```json\n" + "[" * 1000,
    '[TOOL_CALLS] [{"name": "f", "arguments": ' + '{"a": ' * 1000,
    'He said "hi [' + "[" * 2000,  # an odd quote before the brackets
])
@pytest.mark.parametrize("chunks", [1, 7])
def test_deeply_nested_bare_replies_are_text_not_a_recursion_error(reply: str, chunks: int) -> None:
    pieces = _parse(reply, chunks)
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == reply.strip()


@pytest.mark.parametrize("body", [
    "[" * 1000,
    '{"name": "f", "arguments": ' + '{"a": ' * 3000,
    '{"name": "f", "arguments": ' + '[' * 999 + ']' * 999 + "}",  # complete, but too deep
])
def test_deeply_nested_tagged_calls_are_invalid_calls(body: str) -> None:
    (call,) = _parse(f"<tool_call>\n{body}\n</tool_call>", chunks=5)
    assert isinstance(call, InvalidToolCall)
    assert f"more than the {MAX_JSON_DEPTH} allowed" in call.error
    (unterminated,) = _parse(f"<tool_call>\n{body}")
    assert isinstance(unterminated, InvalidToolCall)


def test_nesting_up_to_the_limit_still_parses() -> None:
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_lenient(deep) == json.loads(deep)
    with pytest.raises(InvalidParamsError, match="nested 65 levels deep"):
        loads_lenient("[" + deep + "]")


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(number: str) -> None:
    with pytest.raises(InvalidParamsError, match="finite"):
        loads_lenient(number)
    with pytest.raises(InvalidParamsError, match="finite"):
        loads_lenient(f'{{"x": [{number}]')  # also on the lenient (repairing) paths
    call = parse_call(f'{{"name": "f", "arguments": {{"x": {number}}}}}')
    assert isinstance(call, InvalidToolCall) and "finite" in call.error
    (tagged,) = _parse(f'<tool_call>{{"name": "f", "arguments": {{"x": {number}}}}}</tool_call>')
    assert isinstance(tagged, InvalidToolCall) and "finite" in tagged.error
    # arguments given as a JSON string: the inner number is refused too
    inner = parse_call(json.dumps({"name": "f", "arguments": f'{{"x": {number}}}'}))
    assert isinstance(inner, InvalidToolCall)
    # as a bare reply it is left as text, not turned into a call with Infinity in it
    bare = f'{{"name": "f", "arguments": {{"x": {number}}}}}'
    assert _parse(bare) == [bare]


def test_large_but_finite_numbers_still_parse() -> None:
    call = parse_call('{"name": "f", "arguments": {"x": 1e308, "n": ' + "9" * 400 + "}}")
    assert isinstance(call, ToolCall)
    _strict(call.arguments)
    assert call.arguments["n"] == int("9" * 400)
    huge = parse_call('{"name": "f", "arguments": {"n": ' + "9" * 5000 + "}}")
    assert isinstance(huge, InvalidToolCall)  # past Python's int-from-string limit


def test_a_long_whitespace_fence_parses_quickly() -> None:
    reply = "```json\n" + " " * 50_000 + '{"name": "f", "arguments": {}}' + " " * 50_000 + "```"
    (call,) = _parse(reply, chunks=3)
    assert isinstance(call, ToolCall) and call.name == "f"


def test_history_with_non_json_arguments_is_a_typed_error() -> None:
    with pytest.raises(InvalidParamsError, match="not JSON"):
        render_tool_call("f", {"x": math.inf})
    nested: list[Any] = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(InvalidParamsError, match="not JSON"):
        render_tool_call("f", {"x": nested})
