"""LangChain over a `LlamaEngine`: `ChatLlamaEngine` (a chat model) and `LlamaEngineEmbeddings`.

Needs the `langchain` extra (`pip install "llama-engine[langchain]"`).

```python
from llama_runtime import create_engine
from adapters.langchain import ChatLlamaEngine

engine = create_engine()
chat = ChatLlamaEngine(engine=engine, temperature=0, max_tokens=128)
chat.invoke("Name a prime number.")
for chunk in chat.stream("Tell me a story."):
    print(chunk.content, end="")
```

Messages are rendered with the model's own chat template. `bind_tools` renders tools through
the template when it supports them, and otherwise through a system prompt in the Hermes
`<tool_call>` JSON format (see `adapters._tools`); replies are parsed back into
`AIMessage.tool_calls` (or `tool_call_chunks` when streaming). A required call
(`tool_choice="any"` or a tool's name, and so `with_structured_output`) is written key by key
following the tool's schema (`adapters._forced`), so even a small model returns well-formed
arguments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from adapters._extras import missing_extra

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.embeddings import Embeddings
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.language_models.chat_models import LangSmithParams
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        FunctionMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
    from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.langchain", "langchain", e) from e

from adapters._chat import ChatCall, Event, Final, normalize_tool_choice
from adapters._shared import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_MODEL,
    adapter_keywords,
    check_engine_options,
    shared_engine,
)
from adapters._tools import InvalidToolCall, ToolCall
from llama_engine import (
    InvalidParamsError,
    LlamaEngine,
    SamplingParams,
    UnsupportedOperationError,
    Usage,
)

__all__ = ["ChatLlamaEngine", "LlamaEngineEmbeddings"]

_SAMPLING_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "min_p",
                    "repetition_penalty", "seed", "timeout")
# Call keywords LangChain callers pass that mean nothing to a local engine.
_IGNORED_CALL_KWARGS = frozenset({"parallel_tool_calls", "strict", "stream"})


class ChatLlamaEngine(BaseChatModel):
    """A LangChain chat model backed by a `LlamaEngine`.

    Pass `engine=` (one engine can serve many chat models and threads at once; its scheduler
    batches them). Without it, `model=` (a registered name or a path, default
    "smollm2-135m-instruct") is loaded with `llama_runtime.create_engine(model,
    **engine_options)`, once per process: every adapter naming the same model and options
    shares that engine (see `adapters._shared`).

    The sampling fields are those of `llama_engine.SamplingParams` (None keeps the engine's
    default); any other SamplingParams field may be given as a keyword too (it is kept in
    `sampling`), and keyword arguments to `invoke`/`stream` override both for one call. An
    unknown keyword raises InvalidParamsError listing the allowed ones. `timeout` cancels a
    request after that many seconds. Requests that end (or are cancelled: a closed stream, a
    cancelled asyncio task) free their KV blocks at once.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: LlamaEngine | None = Field(default=None, exclude=True)
    """The engine that generates; built from `model` when not given."""
    model: str | None = None
    """The model's name (filled in from the engine); with no engine, the model to load."""
    engine_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """`create_engine` keywords (backend, device, threads, kv_memory, ...) for an engine built
    from `model`; not allowed with `engine=`."""
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    timeout: float | None = None
    """Seconds after which a request is cancelled (and its KV freed)."""
    stop: list[str] | None = None
    """Strings that end a reply; the `stop` argument of a call replaces them."""
    sampling: dict[str, Any] = Field(default_factory=dict)
    """More `SamplingParams` fields (typical_p, penalties, logit_bias, ignore_eos, ...)."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the model's own (e.g. one that renders tools)."""
    streaming: bool = False
    """Use the streaming path for `invoke` too (callbacks see every token)."""
    max_retries: int | None = Field(default=None, exclude=True)
    """Accepted as one of LangChain's standard chat-model parameters; a local engine makes no
    network call to retry, so it has no effect."""
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    """Accepted as one of LangChain's standard chat-model parameters; a local engine needs no
    key, so it has no effect."""

    def __init__(self, **data: Any) -> None:
        # Checked here rather than in a validator, so errors reach the caller typed (pydantic
        # wraps a ValueError raised in a validator into its ValidationError).
        super().__init__(**adapter_keywords(
            "ChatLlamaEngine", data, type(self).model_fields, sampling=True))
        check_engine_options("ChatLlamaEngine", self.engine, self.engine_options)
        if self.engine is None:
            self.engine = shared_engine(self.model or DEFAULT_MODEL,
                                        options=self.engine_options)
        if self.model is None:
            self.model = self.engine.model.name
        self._params({})  # fail at construction on bad sampling values

    @property
    def _llm_type(self) -> str:
        return "llama-engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, **self._sampling_values(), "stop": self.stop,
                **self.sampling}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="llama_engine",
            ls_model_name=kwargs.get("model") or self.model or "",
            ls_model_type="chat",
        )
        if (t := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = t
        if (n := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = n
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    # -- tools ----------------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[Mapping[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | Mapping[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer `tools` to the model. `tool_choice`: None/"auto" (the model decides), "none",
        "any"/"required"/True (it must call one) or a tool's name (it must call that one)."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        normalize_tool_choice(tool_choice, formatted)  # fail here, not at the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # -- generation -----------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(list(self._call(messages, stop, kwargs).events()))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        events = self._call(messages, stop, kwargs).aevents()
        try:
            return self._result([e async for e in events])
        finally:
            await events.aclose()

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events = self._call(messages, stop, kwargs).events()
        try:
            index = 0
            for event in events:
                chunk = self._chunk(event, index)
                index += isinstance(event, ToolCall | InvalidToolCall)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            events.close()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        events = self._call(messages, stop, kwargs).aevents()
        try:
            index = 0
            async for event in events:
                chunk = self._chunk(event, index)
                index += isinstance(event, ToolCall | InvalidToolCall)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await events.aclose()

    # -- helpers --------------------------------------------------------------------------------
    def _call(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> ChatCall:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        model = kwargs.pop("model", None)
        if model is not None and model not in (self.model, self._engine.model.path):
            raise InvalidParamsError(
                f"this chat model's engine has {self.model!r} loaded, not {model!r}; build "
                "another ChatLlamaEngine over an engine created for that model")
        for name in _IGNORED_CALL_KWARGS:
            kwargs.pop(name, None)
        if stop is not None:
            kwargs["stop"] = stop
        return ChatCall(self._engine, _to_openai(messages), params=self._params(kwargs),
                        tools=tools, tool_choice=tool_choice, chat_template=self.chat_template)

    @property
    def _engine(self) -> LlamaEngine:
        assert self.engine is not None  # set by the validator
        return self.engine

    def _sampling_values(self) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in _SAMPLING_FIELDS}
        return {k: v for k, v in values.items() if v is not None}

    def _params(self, overrides: Mapping[str, Any]) -> SamplingParams:
        merged: dict[str, Any] = {**self._sampling_values(), **self.sampling}
        if self.stop:
            merged["stop"] = tuple(self.stop)
        merged.update(overrides)
        if merged.get("stop") is not None:
            merged["stop"] = tuple(merged["stop"])
        else:
            merged.pop("stop", None)
        return SamplingParams.from_kwargs(**merged)

    def _chunk(self, event: Event, index: int) -> ChatGenerationChunk:
        if isinstance(event, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=event))
        if isinstance(event, ToolCall):
            args = json.dumps(event.arguments, ensure_ascii=False)
            part = tool_call_chunk(name=event.name, args=args, id=event.id, index=index)
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[part]))
        if isinstance(event, InvalidToolCall):
            part = tool_call_chunk(name=event.name, args=event.text, id=event.id, index=index)
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[part]))
        message = AIMessageChunk(
            content="", usage_metadata=_usage(event.usage), chunk_position="last",
            response_metadata={"finish_reason": event.finish_reason, "model_name": self.model})
        return ChatGenerationChunk(message=message,
                                   generation_info={"finish_reason": event.finish_reason})

    def _result(self, events: list[Event]) -> ChatResult:
        text = "".join(e for e in events if isinstance(e, str))
        calls = [tool_call(name=e.name, args=e.arguments, id=e.id)
                 for e in events if isinstance(e, ToolCall)]
        invalid = [invalid_tool_call(name=e.name, args=e.text, id=e.id, error=e.error)
                   for e in events if isinstance(e, InvalidToolCall)]
        final = next((e for e in events if isinstance(e, Final)), None)
        assert final is not None, "a chat call always ends with a Final event"
        message = AIMessage(
            content=text, tool_calls=calls, invalid_tool_calls=invalid,
            usage_metadata=_usage(final.usage),
            response_metadata={"finish_reason": final.finish_reason, "model_name": self.model})
        generation = ChatGeneration(message=message,
                                    generation_info={"finish_reason": final.finish_reason})
        return ChatResult(generations=[generation], llm_output={"model_name": self.model})


def _usage(usage: Usage) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens))


_ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant",
    ToolMessage: "tool", FunctionMessage: "tool",
}


def _to_openai(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI-style dicts, the form the chat template expects."""
    out: list[dict[str, Any]] = []
    for n, m in enumerate(messages):
        role = m.role if isinstance(m, ChatMessage) else next(
            (r for cls, r in _ROLES.items() if isinstance(m, cls)), None)
        if role is None:
            raise InvalidParamsError(
                f"message {n} is a {type(m).__name__}, which has no chat role; use "
                "SystemMessage, HumanMessage, AIMessage or ToolMessage")
        d: dict[str, Any] = {"role": role, "content": _text(m.content, n)}
        if isinstance(m, AIMessage) and m.tool_calls:
            d["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["args"]}}
                for c in m.tool_calls]
        if isinstance(m, ToolMessage):
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


# Content blocks that carry no text for the model: tool calls travel in AIMessage.tool_calls.
_SILENT_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "reasoning", "thinking"})


def _text(content: str | list[Any], n: int) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, Mapping) and block.get("type") in _SILENT_BLOCKS:
            continue
        else:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            raise UnsupportedOperationError(
                f"message {n} holds a {kind!r} content block, but llama-engine models read "
                "text only; send the text alone")
    return "\n".join(parts)


class LlamaEngineEmbeddings(BaseModel, Embeddings):
    """LangChain embeddings from `LlamaEngine.embed`.

    Pass `engine=` (`create_engine(embed_model="all-minilm-l6-v2")` names its encoder), or
    `model=` alone (default "all-minilm-l6-v2"): an embeddings-only engine for it is built once
    per process and shared by every adapter naming the same model and `engine_options` (see
    `adapters._shared`). Texts go to the engine `batch_size` at a time; the async forms run in a
    worker thread. An unknown keyword raises InvalidParamsError listing the allowed ones.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: LlamaEngine | None = Field(default=None, exclude=True)
    """The engine that embeds; built from `model` when not given."""
    model: str | None = None
    """The embedding model to load when no engine is given."""
    engine_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """`create_engine` keywords for an engine built from `model`; not allowed with `engine=`."""
    batch_size: int = Field(default=64, ge=1)

    def __init__(self, **data: Any) -> None:
        super().__init__(**adapter_keywords(
            "LlamaEngineEmbeddings", data, type(self).model_fields, sampling=False))
        check_engine_options("LlamaEngineEmbeddings", self.engine, self.engine_options)
        if self.engine is None:
            self.model = self.model or DEFAULT_EMBED_MODEL
            self.engine = shared_engine(None, embed_model=self.model,
                                        options=self.engine_options)

    @property
    def _engine(self) -> LlamaEngine:
        assert self.engine is not None  # set in __init__
        return self.engine

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._engine.embed(texts[i:i + self.batch_size]))
        return out

    def embed_query(self, text: str) -> list[float]:
        return self._engine.embed([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
