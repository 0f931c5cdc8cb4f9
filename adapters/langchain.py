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

Messages are rendered with the model's own chat template. Tools and structured output are the
core engine's (`LlamaEngine.chat(tools=, tool_choice=)`, `SamplingParams.response_format`, see
`llama_engine.tools`): `bind_tools` offers the tools through the template when it renders them,
else through a Hermes `<tool_call>` system prompt; every call's arguments are constrained to
its tool's schema, and replies come back as `AIMessage.tool_calls` (`tool_call_chunks` when
streaming). `with_structured_output` takes `method="function_calling"` (the default: a required
call to the schema as a tool), `"json_schema"` (the reply is the schema's JSON) or
`"json_mode"` (JSON; constrained to the schema when one is given).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

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
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.langchain", "langchain", e) from e

from adapters._shared import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_MODEL,
    adapter_keywords,
    check_engine_options,
    shared_engine,
)
from llama_engine import (
    Completion,
    InvalidParamsError,
    LlamaEngine,
    SamplingParams,
    StreamChunk,
    TokenStream,
    ToolChoice,
    UnsupportedOperationError,
    Usage,
    check_tools,
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

    # -- tools and structured output ----------------------------------------------------------
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
        ToolChoice.of(tool_choice, check_tools(formatted))  # fail here, not at the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: Mapping[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """A runnable whose output is `schema`'s (a pydantic class, a TypedDict, a JSON schema
        or an OpenAI tool): "function_calling" makes a required call to it as a tool (the model
        sees its description in the tool prompt); "json_schema" constrains the reply to its
        JSON; "json_mode" to any JSON object, or to the schema's when one is given. Every
        method's output is constrained by the core engine, so it parses. `strict` is accepted
        for compatibility: the output is always held to the schema."""
        if kwargs:
            raise InvalidParamsError(f"with_structured_output got unknown arguments {kwargs}")
        if method == "function_calling":
            if schema is None:
                raise InvalidParamsError("method='function_calling' needs a schema")
            return super().with_structured_output(schema, include_raw=include_raw)
        if method not in ("json_schema", "json_mode"):
            raise InvalidParamsError(
                f"method must be 'function_calling', 'json_schema' or 'json_mode', got "
                f"{method!r}")
        if schema is None and method == "json_schema":
            raise InvalidParamsError("method='json_schema' needs a schema")
        pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        json_schema = None if schema is None else convert_to_json_schema(schema)
        response_format: Any = (
            {"type": "json_object"} if json_schema is None
            else schema if pydantic
            else {"type": "json_schema", "json_schema": {"schema": json_schema}})
        llm = self.bind(response_format=response_format, ls_structured_output_format={
            "kwargs": {"method": method}, "schema": json_schema})
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema) if pydantic  # type: ignore[arg-type]
            else JsonOutputParser())
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                            parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed],
                                                            exception_key="parsing_error")

    # -- generation -----------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self._call(messages, stop, kwargs).collect())

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(await self._call(messages, stop, kwargs).acollect())

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stream = self._call(messages, stop, kwargs)
        try:
            calls = 0
            for chunk in stream:
                out = self._chunk(chunk, calls)
                calls += len(chunk.tool_calls or ())
                if run_manager:
                    run_manager.on_llm_new_token(out.text, chunk=out)
                yield out
        finally:
            stream.close()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        stream = self._call(messages, stop, kwargs)
        try:
            calls = 0
            async for chunk in stream:
                out = self._chunk(chunk, calls)
                calls += len(chunk.tool_calls or ())
                if run_manager:
                    await run_manager.on_llm_new_token(out.text, chunk=out)
                yield out
        finally:
            stream.close()

    # -- helpers --------------------------------------------------------------------------------
    def _call(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> TokenStream:
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
        return self._engine.stream_chat(
            _to_openai(messages), tools=tools, tool_choice=tool_choice,
            chat_template=self.chat_template, params=self._params(kwargs))

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

    def _chunk(self, chunk: StreamChunk, calls_before: int) -> ChatGenerationChunk:
        """One engine chunk as LangChain's: its text, the calls it completed (indexed in
        order), and on the last one the usage and finish reason."""
        parts = [tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False),
                                 id=c.id, index=calls_before + i)
                 for i, c in enumerate(chunk.tool_calls or ())]
        if chunk.finish_reason is None:
            return ChatGenerationChunk(
                message=AIMessageChunk(content=chunk.text, tool_call_chunks=parts))
        assert chunk.usage is not None
        message = AIMessageChunk(
            content=chunk.text, tool_call_chunks=parts, usage_metadata=_usage(chunk.usage),
            chunk_position="last",
            response_metadata={"finish_reason": chunk.finish_reason, "model_name": self.model})
        return ChatGenerationChunk(message=message,
                                   generation_info={"finish_reason": chunk.finish_reason})

    def _result(self, done: Completion) -> ChatResult:
        calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in done.tool_calls]
        invalid = [invalid_tool_call(name=c.name, args=c.text, id=c.id, error=c.error)
                   for c in done.invalid_tool_calls]
        message = AIMessage(
            content=done.text, tool_calls=calls, invalid_tool_calls=invalid,
            usage_metadata=_usage(done.usage),
            response_metadata={"finish_reason": done.finish_reason, "model_name": self.model})
        generation = ChatGeneration(message=message,
                                    generation_info={"finish_reason": done.finish_reason})
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
