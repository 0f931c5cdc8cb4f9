"""Tool-call parsing and the forced-call writer on hostile input: whatever a model writes and
whatever schema a tool has, the result is text, a `ToolCall` or an `InvalidToolCall` (or a typed
`LlamaError`), never a RecursionError, a hang, or JSON with `Infinity` in it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Mapping
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from pydantic import BaseModel

from adapters._forced import ForcedCall, Step, forced_call
from adapters._tools import (
    MAX_JSON_DEPTH,
    InvalidToolCall,
    ToolCall,
    ToolCallParser,
    loads_lenient,
    parse_call,
    render_tool_call,
)
from adapters.langchain import ChatLlamaEngine
from llama_engine import Completion, InvalidParamsError, Usage

Answer = Callable[[str, Mapping[str, Any]], Completion]


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


# -- the forced-call writer ---------------------------------------------------------------------
def _run(steps: Generator[Step, Completion, ForcedCall], answer: Answer) -> ForcedCall:
    """Drive the writer with a scripted "model"."""
    try:
        text, overrides = next(steps)
        while True:
            text, overrides = steps.send(answer(text, overrides))
    except StopIteration as done:
        return done.value


def _completion(text: str, ids: list[int] | None = None) -> Completion:
    return Completion(text=text, token_ids=ids or [99], finish_reason="stop",
                      usage=Usage(completion_tokens=1))


def _dutiful(text: str, overrides: Mapping[str, Any]) -> Completion:
    """Picks the first biased token, writes "x" for a string, "7" for a number, {} else."""
    if overrides.get("logit_bias"):
        return _completion("", [next(iter(overrides["logit_bias"]))])
    if '"' in overrides["stop"]:
        return _completion("x")
    if "," in overrides["stop"]:
        return _completion("7")
    return _completion("}" if text.endswith("{") else "{}")


def _tool(parameters: Any, name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


# A linked list: each node has a value and an optional next node (what pydantic writes for
# `next: Node | None`).
LINKED = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
    "value": {"type": "string"},
    "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}}}
# A tree with three children per node: 3**depth values if written out.
TREE = {"type": "object", "properties": {
    "a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"$ref": "#"}}}


@pytest.mark.parametrize("schema", [
    LINKED,
    TREE,
    {"$ref": "#"},  # refers to itself only
    {"type": "object", "properties": {"me": {"$ref": "#/properties/me"}}},
    {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}},
])
@pytest.mark.parametrize("chosen", [True, False])
def test_recursive_refs_end_in_a_call_or_an_invalid_call(schema: Any, chosen: bool) -> None:
    tools = [_tool(schema), _tool({"type": "object", "properties": {}}, "g")]
    steps = forced_call("P", tools, "f" if chosen else None, max_tokens=10_000,
                        tokenize=lambda s: [hash(s) % 1000])
    done = _run(steps, _dutiful)
    assert isinstance(done.call, ToolCall | InvalidToolCall)
    if isinstance(done.call, ToolCall):
        _strict(done.call.arguments)
        body = done.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        assert json.loads(body)["arguments"] == done.call.arguments


def test_a_linked_list_is_written_key_by_key_then_freely() -> None:
    done = _run(forced_call("P", [_tool(LINKED)], "f", max_tokens=10_000,
                            tokenize=lambda s: [1]), _dutiful)
    assert isinstance(done.call, ToolCall)
    node, depth = done.call.arguments, 0
    while isinstance(node, dict) and "value" in node:
        assert node["value"] == "x"
        node, depth = node["next"], depth + 1
    assert depth == 8 and node == {}  # keyed 8 objects deep, the rest left to the model


def test_a_wide_recursive_schema_stops_at_the_budget() -> None:
    done = _run(forced_call("P", [_tool(TREE)], "f", max_tokens=40, tokenize=lambda s: [1]),
                _dutiful)
    assert isinstance(done.call, InvalidToolCall) and "max_tokens ran out" in done.call.error
    assert done.completion_tokens <= 40


@pytest.mark.parametrize("kind", ["integer", "number"])
@pytest.mark.parametrize("said", ["1e999", "-1e999", "9e9999,"])
def test_a_number_out_of_range_is_an_invalid_call_not_infinity(kind: str, said: str) -> None:
    def answer(text: str, overrides: Mapping[str, Any]) -> Completion:
        if overrides.get("logit_bias"):  # the biased first character: "9"
            return _completion("", [9])
        return _completion(said[1:] if text.endswith(said[0]) else said)

    schema = {"type": "object", "properties": {"n": {"type": kind}}}
    done = _run(forced_call("P", [_tool(schema)], "f", max_tokens=30,
                            tokenize=lambda s: [ord(s[0])] if s else []), answer)
    assert isinstance(done.call, InvalidToolCall), done.call
    assert "finite" in done.call.error and "Infinity" not in done.text


def test_an_exact_long_integer_and_a_free_value_stay_strict_json() -> None:
    def answer(text: str, overrides: Mapping[str, Any]) -> Completion:
        if overrides.get("logit_bias"):
            return _completion("", [ord("1")])
        if "," in overrides["stop"]:
            return _completion("2345678901234567890")
        return _completion("[1, 1e999]")  # the free-form value: refused

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "o": {}}}
    done = _run(forced_call("P", [_tool(schema)], "f", max_tokens=30,
                            tokenize=lambda s: [ord(s[0])] if s else []), answer)
    assert isinstance(done.call, InvalidToolCall) and "finite" in done.call.error
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    done = _run(forced_call("P", [_tool(schema)], "f", max_tokens=30,
                            tokenize=lambda s: [ord(s[0])] if s else []), answer)
    assert isinstance(done.call, ToolCall)
    assert done.call.arguments == {"n": 12345678901234567890}  # exact, not via float


@pytest.mark.parametrize("schema", [
    True,  # JSON Schema's "anything"
    {"type": "object", "properties": {"a": True, "b": 3, "c": {"anyOf": "junk"}}},
    {"type": "object", "properties": {"e": {"enum": []}}},
    {"type": "object", "properties": {"k": {"const": math.nan}}},
    {"type": "object", "properties": {"k": {"enum": [math.inf, 1]}}},
    {"type": "object", "properties": {"r": {"$ref": "#/nowhere/at/all"}}},
    {"type": "string"},  # parameters that are not an object
])
def test_malformed_schemas_end_in_a_call_or_an_invalid_call(schema: Any) -> None:
    done = _run(forced_call("P", [_tool(schema)], "f", max_tokens=50,
                            tokenize=lambda s: [ord(s[0])] if s else []), _dutiful)
    assert isinstance(done.call, ToolCall | InvalidToolCall)
    if isinstance(done.call, ToolCall):
        _strict(done.call.arguments)


def test_a_required_call_without_tools_is_a_typed_error() -> None:
    with pytest.raises(InvalidParamsError, match="no tools are bound"):
        next(forced_call("P", [], None, max_tokens=10, tokenize=lambda s: [1]))


class Node(BaseModel):
    """A linked list node."""

    value: str
    next: Node | None = None


def test_a_recursive_pydantic_tool_on_the_real_model(exact_engine: Any) -> None:
    chat = ChatLlamaEngine(engine=exact_engine, temperature=0, max_tokens=40)
    reply = chat.bind_tools([Node], tool_choice="Node").invoke("Make a list: a, b.")
    assert isinstance(reply, AIMessage)
    calls = reply.tool_calls + reply.invalid_tool_calls
    assert len(calls) == 1 and calls[0]["name"] == "Node"
    for call in reply.tool_calls:
        _strict(call["args"])
        assert isinstance(call["args"]["value"], str)
