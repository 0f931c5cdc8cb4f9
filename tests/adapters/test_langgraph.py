"""`adapters.langgraph.chat_node` in real graphs on the default model: streaming, cancellation
(KV blocks freed), four runs at once, and the two-node example script."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from adapters.langgraph import chat_node
from llama_engine import InvalidParamsError

ROOT = Path(__file__).resolve().parents[2]


def _graph(engine: Any, **options: Any) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("chat", chat_node(engine, **options))
    builder.add_edge(START, "chat")
    builder.add_edge("chat", END)
    return builder.compile()


def _idle(engine: Any, before: dict[str, Any]) -> dict[str, Any]:
    """Wait (at most 10 s) until no request runs and KV use is back to `before`."""
    deadline = time.monotonic() + 10
    while True:
        now = engine.stats()
        if (now["requests_running"] == 0 and now["kv_blocks_used"] == before["kv_blocks_used"]
                and now["sessions_active"] == before["sessions_active"]):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def _assert_freed(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["requests_running"] == 0
    assert after["sessions_active"] == before["sessions_active"]
    assert after["kv_blocks_used"] == before["kv_blocks_used"]
    # Full blocks a cancelled request computed may stay as prefix cache; none is held.
    assert (after["kv_blocks_free"] + after["kv_blocks_cached"]
            == before["kv_blocks_free"] + before["kv_blocks_cached"])


async def test_tokens_stream_through_stream_mode_messages(engine: Any) -> None:
    graph = _graph(engine, system="Answer briefly.", temperature=0, max_tokens=12)
    tokens: list[str] = []
    final: dict[str, Any] = {}
    async for mode, payload in graph.astream({"messages": [("user", "Name a fruit.")]},
                                             stream_mode=["messages", "values"]):
        if mode == "values":
            final = payload
            continue
        token, meta = payload
        assert meta["langgraph_node"] == "chat"
        tokens.append(token.content)
    reply = final["messages"][-1]
    assert isinstance(reply, AIMessage) and reply.usage_metadata["output_tokens"] <= 12
    assert len([t for t in tokens if t]) > 1  # streamed token by token, not in one piece
    assert "".join(tokens) == reply.content
    assert [m.type for m in final["messages"]] == ["human", "ai"]  # the system prompt is not state


def test_sync_invoke_and_bad_options(engine: Any) -> None:
    graph = _graph(engine, temperature=0, max_tokens=4)
    out = graph.invoke({"messages": [HumanMessage("Hi")]})
    assert out["messages"][-1].usage_metadata["output_tokens"] <= 4
    with pytest.raises(InvalidParamsError, match="unknown chat_node option"):
        chat_node(engine, max_token=4)
    builder = StateGraph(dict)
    builder.add_node("chat", chat_node(engine))
    builder.add_edge(START, "chat")
    with pytest.raises(InvalidParamsError, match="has no 'messages'"):
        builder.compile().invoke({"question": "hi"})


async def _started(engine: Any, before: dict[str, Any]) -> None:
    for _ in range(1000):
        if engine.stats()["requests_running"] > before["requests_running"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the graph never started generating")


async def test_cancelling_the_run_cancels_generation_and_frees_kv(engine: Any) -> None:
    graph = _graph(engine, max_tokens=2000, sampling={"ignore_eos": True})
    before = _idle(engine, engine.stats())
    task = asyncio.create_task(graph.ainvoke({"messages": [("user", "Tell a long story.")]}))
    await _started(engine, before)
    await asyncio.sleep(0.3)  # some decode steps in
    assert engine.stats()["kv_blocks_used"] > before["kv_blocks_used"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _assert_freed(before, await asyncio.to_thread(_idle, engine, before))


async def test_a_client_going_away_mid_stream_frees_kv(engine: Any) -> None:
    graph = _graph(engine, max_tokens=2000, sampling={"ignore_eos": True})
    before = _idle(engine, engine.stats())
    stream = graph.astream({"messages": [("user", "Tell a long story.")]},
                           stream_mode="messages")
    seen = 0
    async for _token, _meta in stream:
        seen += 1
        if seen == 5:
            break
    await stream.aclose()  # what a web server does when the client disconnects
    _assert_freed(before, await asyncio.to_thread(_idle, engine, before))


QUESTIONS = ["What is the capital of France?", "Name a large animal.",
             "What colour is grass?", "How many legs does a spider have?"]


@pytest.mark.slow
async def test_four_runs_at_once_are_batched_and_each_gets_its_own_answer(
    exact_engine: Any,
) -> None:
    # The exact decode path, whose greedy tokens do not depend on what the prefix cache holds,
    # so each run's answer can be compared with the same question asked alone.
    engine = exact_engine
    graph = _graph(engine, temperature=0, max_tokens=16)
    solo = [(await graph.ainvoke({"messages": [("user", q)]}))["messages"][-1].content
            for q in QUESTIONS]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.stats()["requests_running"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(
        *(graph.ainvoke({"messages": [("user", q)]}) for q in QUESTIONS))
    watcher.cancel()
    for q, state, alone in zip(QUESTIONS, together, solo, strict=True):
        assert state["messages"][0].content == q
        assert state["messages"][-1].content == alone  # greedy: batching changes nothing
    assert len(set(solo)) == len(QUESTIONS)
    assert peak >= 2, "the runs were not served together"


@pytest.mark.slow
def test_example_agent_graph_runs_as_a_script() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_graph.py"), "What is rain?",
         "--max-tokens", "16"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "[answer] " in out.stdout and "[headline] " in out.stdout
    answer = out.stdout.split("[answer] ")[1].split("[headline]")[0]
    assert answer.strip()
