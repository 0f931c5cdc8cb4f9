"""Tools as text, without a model: how tools and earlier calls are rendered for a template
that knows no tools (llama_engine.tools), how a reply is split into text and calls
(llama_engine.tool_calls), and the typed errors for bad tools and tool choices."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_engine import InvalidParamsError, InvalidToolCall, StreamChunk, ToolCall, Usage
from llama_engine.tool_calls import ToolCallParser, loads_lenient
from llama_engine.tools import (
    ToolChoice,
    check_tools,
    inline_tools,
    render_tool_call,
    split_tool_calls,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}}


def _parse(text: str, chunks: int = 1, *, cut_off: bool = False) -> list[Any]:
    parser = ToolCallParser()
    step = max(1, len(text) // chunks)
    out: list[Any] = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i:i + step])
    out += parser.finish(cut_off=cut_off)
    return out


def _merged(pieces: list[Any]) -> list[Any]:
    """Adjacent text pieces joined (streaming splits text arbitrarily)."""
    out: list[Any] = []
    for p in pieces:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        else:
            out.append(p)
    return out


@pytest.mark.parametrize("chunks", [1, 3, 50, 1000])
def test_hermes_calls_are_split_from_text_however_the_reply_is_chunked(chunks: int) -> None:
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
             '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Rome"}}\n</tool_call>')
    pieces = _merged(_parse(reply, chunks))
    assert pieces[0] == "Let me check."
    assert [(p.name, p.arguments) for p in pieces[1:]] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(isinstance(p, ToolCall) and p.id.startswith("call_") for p in pieces[1:])


@pytest.mark.parametrize("reply", [
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',  # Mistral
    '```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n```',
])
def test_bare_json_replies_are_calls(reply: str) -> None:
    (call,) = _parse(reply, chunks=7)
    assert isinstance(call, ToolCall) and call.arguments == {"city": "Oslo"}


def test_plain_text_passes_through_unchanged_even_with_lookalikes() -> None:
    for text in ["Hello there", "a < b and <tool is not a tag", "{not json at all", "[1] item",
                 '{"name": "Alice", "age": 3}',  # JSON, but no call: no arguments
                 '{"name": "get_weather", "arguments": {}} and then some words']:
        assert "".join(_parse(text, chunks=4)) == text


def test_a_bare_call_must_name_an_offered_tool_and_text_streams_at_once() -> None:
    reply = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    offered = ToolCallParser(names=["get_weather"])
    (call,) = offered.feed(reply) + offered.finish()
    assert isinstance(call, ToolCall)
    other = ToolCallParser(names=["add"])
    assert other.feed(reply) + other.finish() == [reply]
    early = ToolCallParser(names=["add"])
    assert early.feed("[1] See the first item") == ["[1] See the first item"]


def test_a_broken_call_is_invalid_and_keeps_the_text_as_written() -> None:
    (bad,) = _parse("<tool_call>\nnot json\n</tool_call>")
    assert isinstance(bad, InvalidToolCall) and "not JSON" in bad.error
    assert bad.text == "<tool_call>\nnot json\n</tool_call>"
    (ended,) = _parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert isinstance(ended, ToolCall) and ended.arguments == {"city": "Pa"}  # closed leniently
    (cut,) = _parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', cut_off=True)
    assert isinstance(cut, InvalidToolCall) and "max_tokens" in cut.error
    assert cut.text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                         max_size=3),
                    max_leaves=8))
def test_loads_lenient_agrees_with_json_on_valid_json(value: Any) -> None:
    assert loads_lenient(json.dumps(value)) == value


def test_inline_tools_turns_calls_and_results_into_text() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function",  # OpenAI's form: the arguments as a JSON string
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "22C", "tool_call_id": "c2"},
    ]
    out = inline_tools(messages, check_tools([WEATHER]))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert out[3]["content"].count("<tool_response>") == 2


def test_inline_tools_joins_content_parts() -> None:
    out = inline_tools([
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}], "tool_call_id": "c1"},
    ], check_tools([WEATHER]))
    assert out[1]["content"] == "Weather\nin Paris?"
    assert out[2]["content"] == "<tool_response>\nsunny\n</tool_response>"


def test_earlier_calls_that_are_not_json_are_typed_errors() -> None:
    with pytest.raises(InvalidParamsError, match="not valid JSON"):
        render_tool_call("f", "{not json")
    with pytest.raises(InvalidParamsError, match="tool_calls must be"):
        inline_tools([{"role": "assistant", "content": "", "tool_calls": ["f()"]}], None)


def test_split_tool_calls_moves_calls_out_of_the_text_and_sets_the_finish_reason() -> None:
    reply = ['Sure', '.\n<tool', '_call>\n{"name": "get_weather", ',
             '"arguments": {"city": "Oslo"}}\n</tool_call>']
    chunks = [StreamChunk(text=t, token_id=i) for i, t in enumerate(reply)]
    chunks[-1].finish_reason, chunks[-1].usage = "stop", Usage()
    out = list(split_tool_calls(iter(chunks)))
    assert "".join(c.text for c in out) == "Sure."
    assert [c.tool_calls for c in out[:-1]] == [None] * 3
    (call,) = out[-1].tool_calls or []
    assert call.arguments == {"city": "Oslo"} and out[-1].finish_reason == "tool_calls"
    # A required call: the prompt opened it, the reply is the JSON only.
    only = [StreamChunk(text='{"name": "get_weather", "arguments": {}}', token_id=1,
                        finish_reason="stop", usage=Usage())]
    (last,) = split_tool_calls(iter(only), "<tool_call>\n")
    assert last.text == "" and last.tool_calls and last.finish_reason == "tool_calls"


def test_bad_tools_and_tool_choices_are_typed_errors() -> None:
    for tools, match in [("get_weather", "must be a list"), ([{"type": "retrieval"}], "only"),
                         ([{"function": {"description": "no name"}}], "needs a 'function'"),
                         ([{"function": {"name": "f", "parameters": "x"}}], "JSON schema")]:
        with pytest.raises(InvalidParamsError, match=match):
            check_tools(tools)
    tools = check_tools([WEATHER, {"name": "add", "parameters": {"type": "object"}}])
    assert tools[1] == {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object"}}}
    assert ToolChoice.of(None, tools) == ToolChoice("auto")
    assert ToolChoice.of(None, []) == ToolChoice("none")
    assert ToolChoice.of("any", tools) == ToolChoice.of("required", tools) == ToolChoice(
        "required")
    assert ToolChoice.of({"type": "function", "function": {"name": "add"}}, tools) == (
        ToolChoice("required", "add"))
    assert ToolChoice.of("add", tools) == ToolChoice("required", "add")  # LangChain's form
    with pytest.raises(InvalidParamsError, match="name one of the tools"):
        ToolChoice.of("subtract", tools)
    with pytest.raises(InvalidParamsError, match="no tools were given"):
        ToolChoice.of("required", [])


@pytest.mark.parametrize("chunks", [1, 4, 100])
def test_copied_tool_response_tags_are_dropped_from_the_answer(chunks: int) -> None:
    assert "".join(_parse("<tool_response>\n12\n</tool_response>", chunks)) == "12"
    assert "".join(_parse("It is <tool_response>sunny</tool_response> today.", chunks)) == (
        "It is sunny today.")
    assert "".join(_parse("a <tool_resp b", chunks)) == "a <tool_resp b"
