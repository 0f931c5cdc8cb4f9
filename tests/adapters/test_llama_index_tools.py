"""`LlamaEngineLLM` as a LlamaIndex `FunctionCallingLLM` on the real default model: tool calls
through `chat_with_tools` (sync, async, streamed), `structured_predict` and `as_structured_llm`,
and a `FunctionAgent` with two tools answering a question end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from adapters.llama_index import LlamaEngineLLM
from llama_engine import GenerationError

CALLED: list[tuple[str, int, int]] = []


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    CALLED.append(("multiply", a, b))
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    CALLED.append(("add", a, b))
    return a + b


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(add)]


@pytest.fixture(scope="module")
def llm(exact_engine: Any) -> LlamaEngineLLM:
    return LlamaEngineLLM(engine=exact_engine, max_tokens=64, temperature=0)


def _check(selection: Any) -> None:
    assert selection.tool_name in ("multiply", "add")
    assert set(selection.tool_kwargs) == {"a", "b"}
    assert all(isinstance(v, int) for v in selection.tool_kwargs.values())


def test_it_is_a_function_calling_llm_whose_calls_are_well_formed(llm: LlamaEngineLLM) -> None:
    assert isinstance(llm, FunctionCallingLLM) and llm.metadata.is_function_calling_model
    reply = llm.chat_with_tools(TOOLS, user_msg="What is 6 times 7?", tool_required=True)
    (call,) = llm.get_tool_calls_from_response(reply)
    _check(call)
    assert any(isinstance(b, ToolCallBlock) for b in reply.message.blocks)
    assert reply.additional_kwargs["finish_reason"] == "tool_calls"
    named = llm.chat_with_tools(TOOLS, user_msg="What is 6 times 7?", tool_choice="add")
    assert [c.tool_name for c in llm.get_tool_calls_from_response(named)] == ["add"]


def test_streamed_and_async_calls_agree(llm: LlamaEngineLLM) -> None:
    ask = {"user_msg": "What is 6 times 7?", "tool_required": True}
    whole = llm.get_tool_calls_from_response(llm.chat_with_tools(TOOLS, **ask))
    *_, last = llm.stream_chat_with_tools(TOOLS, **ask)
    streamed = llm.get_tool_calls_from_response(last)

    async def run() -> Any:
        return llm.get_tool_calls_from_response(await llm.achat_with_tools(TOOLS, **ask))

    awaited = asyncio.run(run())
    assert [(c.tool_name, c.tool_kwargs) for c in whole] == [
        (c.tool_name, c.tool_kwargs) for c in streamed] == [
        (c.tool_name, c.tool_kwargs) for c in awaited]


def test_a_reply_without_a_call_is_a_typed_error_only_when_asked(llm: LlamaEngineLLM) -> None:
    reply = llm.chat_with_tools(TOOLS, user_msg="Say hello.", tool_choice="none")
    assert reply.message.content
    assert llm.get_tool_calls_from_response(reply, error_on_no_tool_call=False) == []
    with pytest.raises(GenerationError, match="calls no tool"):
        llm.get_tool_calls_from_response(reply)


class Song(BaseModel):
    """A song."""

    title: str = Field(max_length=40)
    year: int = Field(ge=1900, le=2030)


def test_structured_predict_and_structured_llm_return_the_class(llm: LlamaEngineLLM) -> None:
    song = llm.structured_predict(Song, PromptTemplate("Name a song from {year}."), year="1990")
    assert isinstance(song, Song)
    structured = llm.as_structured_llm(Song)
    reply = structured.chat([ChatMessage(role="user", content="Name a famous song.")])
    assert isinstance(reply.raw, Song)
    assert Song.model_validate_json(reply.message.content or "") == reply.raw

    async def run() -> Song:
        return await llm.astructured_predict(Song, PromptTemplate("Name a song."))

    assert isinstance(asyncio.run(run()), Song)


def test_a_function_agent_with_two_tools_answers_end_to_end(llm: LlamaEngineLLM) -> None:
    CALLED.clear()
    agent = FunctionAgent(tools=TOOLS, llm=llm, initial_tool_choice="multiply",
                          system_prompt="You do arithmetic with the tools.")

    async def run() -> tuple[Any, list[Any]]:
        handler = agent.run("What is 6 times 7?")
        events = [e async for e in handler.stream_events()]
        return await handler, events

    result, events = asyncio.run(run())
    results = [e for e in events if isinstance(e, ToolCallResult)]
    assert results and results[0].tool_name == "multiply"
    assert CALLED[0] == ("multiply", *results[0].tool_kwargs.values())
    assert str(results[0].tool_output.content) == str(CALLED[0][1] * CALLED[0][2])
    assert any(isinstance(e, AgentStream) and e.delta for e in events)  # the answer streamed
    answer = str(result.response.content or "")
    assert answer and "<tool_response>" not in answer
