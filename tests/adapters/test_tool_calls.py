"""Tool calls as text (adapters._tools, adapters._forced): rendering, parsing, streaming splits,
and the schema-guided writer; then `ChatLlamaEngine.bind_tools` end to end on the real model."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from adapters._forced import forced_call
from adapters._tools import (
    InvalidToolCall,
    ToolCall,
    ToolCallParser,
    inline_tools,
    loads_lenient,
    template_supports_tools,
)
from adapters.langchain import ChatLlamaEngine
from llama_engine import (
    Completion,
    InvalidParamsError,
    ModelNotFoundError,
    UnsupportedOperationError,
    Usage,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}}


def _parse(text: str, chunks: int = 1) -> list[Any]:
    parser = ToolCallParser()
    step = max(1, len(text) // chunks)
    out: list[Any] = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i:i + step])
    out += parser.finish()
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
    for text in ["Hello there", "a < b and <tool is not a tag", "{not json at all", "[1] item"]:
        assert "".join(_parse(text, chunks=4)) == text


def test_a_broken_call_is_invalid_not_lost() -> None:
    (bad,) = _parse("<tool_call>\nnot json\n</tool_call>")
    assert isinstance(bad, InvalidToolCall) and "not JSON" in bad.error
    (cut,) = _parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert isinstance(cut, ToolCall) and cut.arguments == {"city": "Pa"}  # closed leniently


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
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "22C", "tool_call_id": "c1"},
    ]
    out = inline_tools(messages, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                 '{"city": "Paris"}}\n</tool_call>')
    assert out[3]["content"].count("<tool_response>") == 2


def test_inline_tools_joins_content_parts() -> None:
    out = inline_tools([
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}], "tool_call_id": "c1"},
    ], [WEATHER])
    assert out[1]["content"] == "Weather\nin Paris?"
    assert out[2]["content"] == "<tool_response>\nsunny\n</tool_response>"


def test_forced_writer_fills_only_values_and_keeps_the_schema() -> None:
    # What the "model" writes at each step: free text, then one biased token for the boolean.
    said = iter([("Paris", []), (" 3,", []), (" true", [11])])
    vocab = {" true": [11], " false": [12]}
    steps = forced_call("PROMPT", [WEATHER], "get_weather", max_tokens=30,
                        tokenize=lambda s: vocab.get(s, [99]))
    prompts = [next(steps)]
    try:
        while True:
            text, ids = next(said)
            prompts.append(steps.send(Completion(
                text=text, token_ids=ids, finish_reason="stop",
                usage=Usage(completion_tokens=2))))
    except StopIteration as done:
        result = done.value
    assert isinstance(result.call, ToolCall)
    assert result.call.arguments == {"city": "Paris", "days": 3, "metric": True}
    assert prompts[0][0].endswith('"arguments": {"city": "')
    assert prompts[0][1]["stop"] == ['"', "\n"]
    assert prompts[1][0].endswith('"city": "Paris", "days": ')  # numbers follow a space
    assert prompts[2][1]["logit_bias"] == {11: 100.0, 12: 100.0}
    assert prompts[2][1]["max_tokens"] == 1
    body = result.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    assert json.loads(body) == {"name": "get_weather", "arguments": result.call.arguments}
    assert result.completion_tokens == 6


# -- on the real model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(exact_engine: Any) -> ChatLlamaEngine:
    # The exact decode path: greedy replies to one prompt agree across calls (the stop test).
    return ChatLlamaEngine(engine=exact_engine, temperature=0, max_tokens=40)


def test_smollm2_template_has_no_tools_so_the_fallback_prompt_is_used(engine: Any) -> None:
    assert template_supports_tools(engine) is False


def test_forced_call_round_trip_with_history(chat: ChatLlamaEngine) -> None:
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    first = bound.invoke("What's the weather in Paris for the next 2 days, in metric?")
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days", "metric"}
    assert isinstance(call["args"]["days"], int) and isinstance(call["args"]["metric"], bool)
    assert first.response_metadata["finish_reason"] == "tool_calls"
    history = [HumanMessage("Weather in Paris?"), first,
               ToolMessage("Sunny, 22C", tool_call_id=call["id"])]
    answer = chat.bind_tools([WEATHER]).invoke(history)
    assert isinstance(answer, AIMessage) and answer.usage_metadata["input_tokens"] > 0


# ChatML with tools rendered by the template itself (the shape of Qwen2.5's template).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    '{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_renders_tools_gets_them_natively(exact_engine: Any) -> None:
    assert template_supports_tools(exact_engine, chat_template=TOOLS_TEMPLATE)
    chat = ChatLlamaEngine(engine=exact_engine, chat_template=TOOLS_TEMPLATE, temperature=0,
                           max_tokens=24)
    first = chat.bind_tools([WEATHER], tool_choice="any").invoke("Weather in Rome?")
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    history = [HumanMessage("Weather in Rome?"), first,
               ToolMessage("Sunny", tool_call_id=call["id"])]
    answer = chat.bind_tools([WEATHER]).invoke(history)
    assert answer.usage_metadata["input_tokens"] > 0  # rendered with role "tool", no error


def test_stop_and_sampling_overrides_reach_the_engine(chat: ChatLlamaEngine) -> None:
    full = chat.invoke("Count from one to ten in words.", max_tokens=30).content
    words = full.split()
    assert len(words) > 3, full
    cut = chat.invoke("Count from one to ten in words.", max_tokens=30, stop=[words[2]])
    assert cut.content == full[: full.index(words[2])]
    assert cut.response_metadata["finish_reason"] == "stop"
    short = chat.invoke("Count from one to ten in words.", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    assert short.response_metadata["finish_reason"] == "length"


def test_bad_input_raises_typed_errors(chat: ChatLlamaEngine, engine: Any) -> None:
    with pytest.raises(InvalidParamsError, match="tool_choice must be"):
        chat.bind_tools([WEATHER], tool_choice="no_such_tool")
    with pytest.raises(InvalidParamsError, match="unknown sampling parameter"):
        chat.invoke("hi", max_tokenz=3)
    with pytest.raises(InvalidParamsError, match="has 'smollm2-135m-instruct' loaded"):
        chat.invoke("hi", model="gpt-4o")
    with pytest.raises(UnsupportedOperationError, match="read text only"):
        chat.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(ValueError, match="temperature must be"):
        ChatLlamaEngine(engine=engine, temperature=-1)
    with pytest.raises(ModelNotFoundError, match="unknown model name"):
        ChatLlamaEngine(model="no-such-model")  # no engine given: one is built from `model`
