"""`ChatLlamaEngine`'s tools and structured output on the real model: `bind_tools` (required,
named, auto, history with tool results, a template that renders tools), `with_structured_output`
with each method, sampling overrides and typed errors. The calls are the core engine's
(tests/llama_runtime/test_tool_calling.py); these check they reach LangChain's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field
from templates import TOOLS_TEMPLATE

from adapters.langchain import ChatLlamaEngine
from llama_engine import InvalidParamsError, ModelNotFoundError, UnsupportedOperationError
from llama_engine.tools import template_supports_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}}


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
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert set(call["args"]) <= {"city", "days", "metric"}
    assert isinstance(call["args"].get("days", 0), int)
    assert isinstance(call["args"].get("metric", False), bool)
    assert first.response_metadata["finish_reason"] == "tool_calls"
    history = [HumanMessage("Weather in Paris?"), first,
               ToolMessage("Sunny, 22C", tool_call_id=call["id"])]
    answer = chat.bind_tools([WEATHER]).invoke(history)
    assert isinstance(answer, AIMessage) and answer.usage_metadata["input_tokens"] > 0


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


def test_a_streamed_call_arrives_as_tool_call_chunks(chat: ChatLlamaEngine) -> None:
    bound = chat.bind_tools([WEATHER], tool_choice="any", max_tokens=64)
    chunks = list(bound.stream("Weather in Oslo?"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole, AIMessageChunk) and whole.content == ""
    (call,) = whole.tool_calls
    assert call == {**bound.invoke("Weather in Oslo?").tool_calls[0], "id": call["id"]}
    assert whole.response_metadata["finish_reason"] == "tool_calls"
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] > 0


def test_a_call_cut_by_max_tokens_is_an_invalid_call_and_text(chat: ChatLlamaEngine) -> None:
    reply = chat.bind_tools([WEATHER], tool_choice="any").invoke("Weather?", max_tokens=5)
    assert reply.response_metadata["finish_reason"] == "length" and not reply.tool_calls
    (bad,) = reply.invalid_tool_calls
    assert "max_tokens" in (bad["error"] or "") and reply.content == bad["args"]


class Joke(BaseModel):
    """A joke to tell the user."""

    model_config = ConfigDict(extra="forbid")
    setup: str = Field(description="the question that sets up the joke", max_length=80)
    punchline: str = Field(description="the answer", max_length=80)
    rating: int | None = Field(default=None, ge=1, le=10)


JOKE_SCHEMA = {"title": "joke", "description": "A joke to tell the user.", "type": "object",
               "required": ["setup", "punchline"], "additionalProperties": False,
               "properties": {"setup": {"type": "string", "maxLength": 60},
                              "punchline": {"type": "string", "maxLength": 60}}}


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_with_structured_output_every_method_parses(chat: ChatLlamaEngine, method: str) -> None:
    chat = ChatLlamaEngine(engine=chat.engine, temperature=0, max_tokens=96)
    structured = chat.with_structured_output(Joke, method=method)  # type: ignore[arg-type]
    assert isinstance(structured.invoke("Tell me a joke about cats."), Joke)
    streamed = list(structured.stream("Tell me a joke about dogs."))
    assert streamed and all(isinstance(j, Joke) for j in streamed)
    as_dict = chat.with_structured_output(JOKE_SCHEMA, method=method)  # type: ignore[arg-type]
    value = as_dict.invoke("Tell me a joke about cats.")
    assert isinstance(value, dict) and set(value) == {"setup", "punchline"}
    raw = chat.with_structured_output(Joke, method=method, include_raw=True)  # type: ignore
    out = raw.invoke("Tell me a joke about birds.")
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Joke)
    assert out["parsing_error"] is None


def test_json_mode_without_a_schema_is_any_json_object(chat: ChatLlamaEngine) -> None:
    value = chat.with_structured_output(None, method="json_mode").invoke(
        "Describe a cat as JSON.", max_tokens=48)
    assert isinstance(value, dict)
    with pytest.raises(InvalidParamsError, match="needs a schema"):
        chat.with_structured_output(None, method="json_schema")
    with pytest.raises(InvalidParamsError, match="method must be"):
        chat.with_structured_output(Joke, method="xml")  # type: ignore[arg-type]


class Node(BaseModel):
    """A linked list node."""

    value: str = Field(max_length=8)
    next: Node | None = None


def test_a_recursive_pydantic_tool_on_the_real_model(chat: ChatLlamaEngine) -> None:
    reply = chat.bind_tools([Node], tool_choice="Node").invoke("Make a list: a, b.",
                                                                max_tokens=96)
    assert isinstance(reply, AIMessage)
    (call,) = reply.tool_calls
    assert call["name"] == "Node" and isinstance(call["args"]["value"], str)
    assert json.loads(json.dumps(call["args"], allow_nan=False)) == call["args"]
