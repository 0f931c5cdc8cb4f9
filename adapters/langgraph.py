"""LangGraph nodes over a `LlamaEngine`. Needs the `langgraph` extra.

```python
from langgraph.graph import END, START, MessagesState, StateGraph
from adapters.langgraph import chat_node

builder = StateGraph(MessagesState)
builder.add_node("chat", chat_node(engine, system="Answer in one sentence.", max_tokens=128))
builder.add_edge(START, "chat")
builder.add_edge("chat", END)
graph = builder.compile()

async for token, meta in graph.astream({"messages": [("user", "Hi!")]},
                                       stream_mode="messages"):
    print(token.content, end="", flush=True)
```

A node calls the model through `adapters.langchain.ChatLlamaEngine` with the run's config, so
its tokens reach LangGraph's `stream_mode="messages"` as they are generated, and tracing
callbacks see the call. Cancelling the run (cancelling the task that awaits `ainvoke` or
`astream`, or closing the `astream` iterator when a client goes away) cancels the generation
within one decode step and frees its KV blocks. Several runs at once on one engine are batched
by its scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapters._extras import missing_extra

try:
    from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, convert_to_messages
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.langgraph", "langgraph", e) from e

from adapters._shared import SAMPLING_FIELDS, check_keywords
from adapters.langchain import ChatLlamaEngine
from llama_engine import InvalidParamsError, LlamaEngine

__all__ = ["chat_node"]


def chat_node(
    engine: LlamaEngine,
    *,
    system: str | None = None,
    tools: Sequence[Any] | None = None,
    tool_choice: str | Mapping[str, Any] | bool | None = None,
    messages_key: str = "messages",
    name: str = "chat",
    **options: Any,
) -> Runnable[Any, dict[str, list[AIMessage]]]:
    """A graph node that replies to the conversation in `state[messages_key]`.

    It returns `{messages_key: [reply]}`, which appends the reply under `MessagesState`'s
    `add_messages` reducer. `system` is put first unless the conversation already starts with a
    system message. `tools` (LangChain tools, functions or schemas) are bound with
    `tool_choice` (see `ChatLlamaEngine.bind_tools`), so the reply may carry `tool_calls` for a
    `ToolNode`. `options` are `ChatLlamaEngine` keywords: temperature, max_tokens, top_p, seed,
    stop, timeout, sampling, any other SamplingParams field, ...; an unknown one raises
    InvalidParamsError listing the allowed ones.
    """
    # The engine is the first argument, so engine_options (for building one) mean nothing here.
    allowed = (set(ChatLlamaEngine.model_fields) | SAMPLING_FIELDS) - {"engine", "engine_options"}
    check_keywords("chat_node", options, allowed, noun="option(s)")
    chat = ChatLlamaEngine(engine=engine, **options)
    model: Runnable[Any, AIMessage] = (
        chat.bind_tools(tools, tool_choice=tool_choice) if tools else chat)

    def conversation(state: Any) -> list[BaseMessage]:
        messages = (state.get(messages_key) if isinstance(state, Mapping)
                    else getattr(state, messages_key, None))
        if messages is None:
            raise InvalidParamsError(
                f"the graph state has no {messages_key!r}; use MessagesState (or a state with "
                f"a list of messages under that key), or pass messages_key=")
        out = convert_to_messages(messages)
        if system and not (out and isinstance(out[0], SystemMessage)):
            out.insert(0, SystemMessage(system))
        return out

    def node(state: Any, config: RunnableConfig) -> dict[str, list[AIMessage]]:
        return {messages_key: [model.invoke(conversation(state), config)]}

    async def anode(state: Any, config: RunnableConfig) -> dict[str, list[AIMessage]]:
        return {messages_key: [await model.ainvoke(conversation(state), config)]}

    return RunnableLambda(node, afunc=anode, name=name)
