"""A two-node LangGraph agent on the default local model, streaming its tokens.

    pip install -e ".[langgraph]"
    python examples/agent_graph.py "Why is the sky blue?"

`answer` replies to the question (a ready-made `chat_node`); `headline` then writes a headline
for that answer (a hand-written node calling `ChatLlamaEngine`). Both stream through
`stream_mode="messages"`, so tokens print as they are generated, labelled with their node.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

from adapters.langchain import ChatLlamaEngine
from adapters.langgraph import chat_node
from llama_engine import LlamaEngine


def build_graph(engine: LlamaEngine, *, max_tokens: int = 96) -> CompiledStateGraph:
    """START -> answer -> headline -> END over one engine."""
    writer = ChatLlamaEngine(engine=engine, temperature=0, max_tokens=max(8, max_tokens // 4))

    async def headline(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        answer = state["messages"][-1].content
        reply = await writer.ainvoke(
            [SystemMessage("You write short headlines."),
             HumanMessage(f"Write a headline of at most six words for this text:\n\n{answer}")],
            config)
        return {"messages": [AIMessage(reply.content, name="headline", id=reply.id)]}

    builder = StateGraph(MessagesState)
    builder.add_node("answer", chat_node(engine, system="Answer in two or three sentences.",
                                         temperature=0, max_tokens=max_tokens))
    builder.add_node("headline", headline)
    builder.add_edge(START, "answer")
    builder.add_edge("answer", "headline")
    builder.add_edge("headline", END)
    return builder.compile()


async def run(graph: CompiledStateGraph, question: str) -> dict[str, Any]:
    """Stream one run to stdout, a line per node; returns the final state."""
    node, state = None, {}
    async for mode, payload in graph.astream({"messages": [HumanMessage(question)]},
                                             stream_mode=["messages", "values"]):
        if mode == "values":
            state = payload
            continue
        token, meta = payload
        if meta["langgraph_node"] != node:
            node = meta["langgraph_node"]
            print(f"\n[{node}] ", end="")
        print(token.content, end="", flush=True)
    print()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="Why is the sky blue?")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    from llama_runtime import create_engine

    engine = create_engine(args.model, progress=False)
    asyncio.run(run(build_graph(engine, max_tokens=args.max_tokens), args.question))
    return 0


if __name__ == "__main__":
    sys.exit(main())
