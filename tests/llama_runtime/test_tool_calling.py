"""Tool calling in the core (`LlamaEngine.chat(tools=, tool_choice=)`) on the real default model:
required, named, auto and none; calls constrained to the tools' schemas; calls streamed as they
complete; a reply cut inside a call ends "length" with its text; tool results continue the
conversation, through the fallback prompt and through a template that renders tools; bad tools
are typed errors before any decoding; a constrained call and a free reply share steps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from templates import TOOLS_TEMPLATE

from llama_engine import InvalidParamsError, ToolCall
from llama_engine.tools import plan_chat, template_supports_tools
from llama_runtime.bench import at_once

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(call: ToolCall) -> None:
    """The call is to one of TOOLS, with arguments of its schema."""
    args = call.arguments
    if call.name == "get_weather":
        assert isinstance(args["city"], str) and set(args) <= {"city", "unit"}
        assert args.get("unit", "celsius") in ("celsius", "fahrenheit")
    else:
        assert call.name == "add" and set(args) == {"a", "b"}
        assert all(isinstance(v, int) for v in args.values())


def test_a_required_call_is_well_formed_and_is_the_whole_reply(engine) -> None:
    done = engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64)
    (call,) = done.tool_calls
    _valid(call)
    assert call.id.startswith("call_") and done.text == "" and not done.invalid_tool_calls
    assert done.finish_reason == "tool_calls"
    named = engine.chat(ASK, tools=TOOLS, temperature=0, max_tokens=64,
                        tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = named.tool_calls
    assert call.name == "add"
    _valid(call)


def test_required_calls_are_well_formed_whatever_the_sampling(engine) -> None:
    for seed in range(4):
        done = engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.5,
                           seed=seed, max_tokens=96)
        assert done.finish_reason == "tool_calls", done
        for call in done.tool_calls:
            _valid(call)


def test_auto_lets_the_model_answer_in_text_and_none_hides_the_tools(engine) -> None:
    auto = engine.chat(ASK, tools=TOOLS, temperature=0, max_tokens=48)
    assert auto.text and not auto.tool_calls and auto.finish_reason in ("stop", "length")
    none = engine.chat(ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=48)
    assert none.text == engine.chat(ASK, temperature=0, max_tokens=48).text


# A conversation in which the model has called get_weather five times: it calls again, in the
# Hermes format, so "auto" meets real calls (each constrained once opened).
CALLS = "".join(
    f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>\n'
    for c in ("London", "Rome", "Oslo", "Madrid", "Berlin"))
HABIT = [{"role": "user", "content": "Weather in London, Rome, Oslo, Madrid and Berlin?"},
         {"role": "assistant", "content": CALLS},
         {"role": "user", "content": "Again, the same calls, and add Paris."}]


def test_auto_calls_are_constrained_once_opened_and_stream_as_they_complete(engine) -> None:
    chunks = list(engine.stream_chat(HABIT, tools=TOOLS, temperature=0, max_tokens=160))
    calls = [c for chunk in chunks for c in chunk.tool_calls or ()]
    assert len(calls) >= 2
    for call in calls:
        _valid(call)
    # each call arrives on the chunk whose token closed it, and its text stays out of `text`
    with_calls = [i for i, chunk in enumerate(chunks) if chunk.tool_calls]
    assert with_calls[0] < len(chunks) - 1
    assert "<tool_call>" not in "".join(c.text for c in chunks[:with_calls[-1] + 1])
    # greedy and constrained, the whole reply agrees with the collected one
    whole = engine.chat(HABIT, tools=TOOLS, temperature=0, max_tokens=160)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [
        (c.name, c.arguments) for c in calls]


def test_a_reply_cut_inside_a_call_ends_length_with_its_text(engine) -> None:
    done = engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=6)
    assert done.finish_reason == "length" and not done.tool_calls
    (cut,) = done.invalid_tool_calls
    assert "max_tokens" in cut.error and done.text == cut.text
    assert done.text.startswith("<tool_call>\n{") and done.usage.completion_tokens == 6


def test_a_call_near_max_tokens_is_closed_in_time(engine) -> None:
    """Greedy, the default model writes "A cat is a cat, a cat is a cat, ..." into the joke's
    setup forever; the end of the budget closes the call instead of cutting it."""
    joke = {"type": "function", "function": {"name": "Joke", "parameters": {
        "type": "object", "required": ["setup", "punchline"],
        "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}}}}}
    ask = [{"role": "user", "content": "Tell me a joke about cats."}]
    done = engine.chat(ask, tools=[joke], tool_choice="required", temperature=0,
                       max_tokens=64)
    (call,) = done.tool_calls
    assert set(call.arguments) == {"setup", "punchline"} and done.finish_reason == "length"
    assert done.text == "" and done.usage.completion_tokens <= 64


def test_tool_results_continue_the_conversation(engine) -> None:
    first = engine.chat(ASK, tools=TOOLS, tool_choice="get_weather", temperature=0,
                        max_tokens=64)
    (call,) = first.tool_calls
    history = [*ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": call.id, "type": "function", "function": {
                       "name": call.name, "arguments": json.dumps(call.arguments)}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    prompt = engine.apply_chat_template(history)  # no tools in this template: the fallback
    assert template_supports_tools(engine) is False
    answer = engine.chat(history, tools=TOOLS, temperature=0, max_tokens=32)
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > len(engine.tokenize(prompt, add_special=False))


def test_a_template_that_renders_tools_gets_them_and_their_results(engine) -> None:
    assert template_supports_tools(engine, chat_template=TOOLS_TEMPLATE)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",  # OpenAI's form: the arguments as a JSON string
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    plan = plan_chat(engine, history, tools=TOOLS, chat_template=TOOLS_TEMPLATE)
    assert '{"name": "get_weather", "arguments": {"city": "Rome"}}' in plan.prompt
    first = engine.chat(ASK, tools=TOOLS, tool_choice="required", chat_template=TOOLS_TEMPLATE,
                        temperature=0, max_tokens=64)
    (call,) = first.tool_calls
    _valid(call)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = engine.chat(history, tools=TOOLS, chat_template=TOOLS_TEMPLATE, temperature=0,
                         max_tokens=16)
    assert answer.usage.completion_tokens > 0


def test_async_chat_with_tools(engine) -> None:
    async def both() -> list[Any]:
        return await asyncio.gather(*(
            engine.achat(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64)
            for _ in range(2)))

    first, second = asyncio.run(both())
    assert [(c.name, c.arguments) for c in first.tool_calls] == [
        (c.name, c.arguments) for c in second.tool_calls]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tools": "get_weather"}, "must be a list"),
    ({"tools": [WEATHER], "tool_choice": "add"}, "name one of the tools"),
    ({"tool_choice": "required"}, "no tools were given"),
    ({"tools": [{"function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "nonsense"}}}}}]}, "not a valid grammar"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "not both"),
    ({"tools": [WEATHER], "messages": [{"role": "assistant", "content": "",
                                         "tool_calls": [{"function": {"name": "f",
                                                                      "arguments": "{x"}}]}]},
     "not valid JSON"),
])
def test_bad_tools_are_typed_errors_before_decoding(engine, kwargs: dict[str, Any],
                                                    match: str) -> None:
    messages = kwargs.pop("messages", ASK)
    before = engine.stats()
    with pytest.raises(InvalidParamsError, match=match):
        engine.stream_chat(messages, max_tokens=8, **kwargs)
    after = engine.stats()
    assert after["sessions_active"] == before["sessions_active"]


def test_a_constrained_call_and_a_free_reply_share_steps(engine) -> None:
    def one(i: int) -> Any:
        if i % 2:
            return engine.chat(ASK, temperature=0, max_tokens=24)
        return engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0,
                           max_tokens=64)

    replies = at_once(one, 4)
    alone_call = engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0,
                             max_tokens=64)
    alone_text = engine.chat(ASK, temperature=0, max_tokens=24)
    for i, reply in enumerate(replies):
        if i % 2:
            assert reply.text == alone_text.text
        else:
            assert [(c.name, c.arguments) for c in reply.tool_calls] == [
                (c.name, c.arguments) for c in alone_call.tool_calls]


@pytest.mark.slow
def test_a_model_without_a_chat_template_gets_the_fallback_transcript() -> None:
    """gemma3-270m (a base model, 262k SentencePiece vocabulary) has no chat template: plain
    chat stays an error, a chat with tools is written as a transcript and still calls."""
    from llama_engine import UnsupportedOperationError
    from llama_engine.tools import FALLBACK_TEMPLATE
    from llama_runtime import create_engine

    with create_engine("gemma3-270m", progress=False) as gemma:
        assert not gemma.model.has_chat_template
        with pytest.raises(UnsupportedOperationError, match="no chat template"):
            gemma.chat(ASK, max_tokens=4)
        plan = plan_chat(gemma, ASK, tools=TOOLS, tool_choice="required")
        assert plan.prompt == gemma.apply_chat_template(
            [{"role": "system", "content": plan.prompt.split("\n\nUser:")[0][8:]}, *ASK],
            chat_template=FALLBACK_TEMPLATE) + "<tool_call>\n"
        done = gemma.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0,
                          max_tokens=48)
        (call,) = done.tool_calls
        _valid(call)
