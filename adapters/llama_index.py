"""LlamaIndex over a `LlamaEngine`: `LlamaEngineLLM` and `LlamaEngineEmbedding`.

Needs the `llama-index` extra (`pip install "llama-engine[llama-index]"`).

```python
from llama_index.core import VectorStoreIndex
from llama_runtime import create_engine
from adapters.llama_index import LlamaEngineEmbedding, LlamaEngineLLM

engine = create_engine(embed_model="all-minilm-l6-v2")      # generates and embeds
index = VectorStoreIndex.from_documents(docs, embed_model=LlamaEngineEmbedding(engine=engine))
answer = index.as_query_engine(llm=LlamaEngineLLM(engine=engine), streaming=True).query("...")
answer.print_response_stream()
```

Pass the LLM and the embedding model explicitly (as above, or through `Settings`): LlamaIndex's
own defaults are hosted services. `chat` renders messages with the model's chat template;
`complete` is a raw completion of the prompt (after `completion_to_prompt`, if set). The async
forms stream without blocking the event loop, and stopping a stream early (or cancelling its
task) frees the request's KV blocks.

`LlamaEngineLLM` is a `FunctionCallingLLM`: `chat_with_tools` (and its async and streaming
forms) runs the core engine's tool calling (`LlamaEngine.chat(tools=, tool_choice=)`), whose
calls are constrained to the tools' schemas; the calls come back as `ToolCallBlock`s in the
reply (`get_tool_calls_from_response` reads them). So `FunctionAgent`, `structured_predict`
and `as_structured_llm` work, the last two through a required call to the output class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from adapters._extras import missing_extra

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        TextBlock,
        ToolCallBlock,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.tools import BaseTool
    from pydantic import ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.llama_index", "llama-index", e) from e

from adapters._shared import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_MODEL,
    adapter_keywords,
    check_engine_options,
    shared_engine,
)
from llama_engine import (
    GenerationError,
    InvalidParamsError,
    LlamaEngine,
    SamplingParams,
    StreamChunk,
    TokenStream,
    UnsupportedOperationError,
    Usage,
)

__all__ = ["LlamaEngineEmbedding", "LlamaEngineLLM"]

# The SamplingParams fields LlamaEngineLLM declares (the rest go in `sampling`).
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "seed", "stop", "timeout")
_ROLES = {MessageRole.DEVELOPER: "system", MessageRole.CHATBOT: "assistant",
          MessageRole.MODEL: "assistant", MessageRole.FUNCTION: "tool"}


class LlamaEngineLLM(FunctionCallingLLM):
    """A LlamaIndex LLM backed by a `LlamaEngine` (one engine can serve many at once).

    Pass `engine=`, or `model=` alone (a registered name or a path, default
    "smollm2-135m-instruct"): its engine is built with `create_engine(model, **engine_options)`
    once per process and shared by every adapter naming the same model and options (see
    `adapters._shared`).

    `max_tokens` is the reply budget (`metadata.num_output`); `context_window` defaults to the
    loaded model's context. `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`,
    `seed`, `stop` and `timeout` are `SamplingParams` fields (None keeps the engine's
    defaults); any other SamplingParams field may be given as a keyword too (it is kept in
    `sampling`), and keyword arguments to a call override them all. An unknown keyword raises
    InvalidParamsError listing the allowed ones.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: LlamaEngine | None = Field(default=None, exclude=True)
    """The engine that generates; built from `model` when not given."""
    model: str | None = None
    """The model's name (filled in from the engine); with no engine, the model to load."""
    engine_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """`create_engine` keywords (backend, device, threads, kv_memory, ...) for an engine built
    from `model`; not allowed with `engine=`."""
    max_tokens: int = Field(default=256, ge=1)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    """Seconds after which a request is cancelled (and its KV freed)."""
    context_window: int | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    """More `SamplingParams` fields (typical_p, penalties, logit_bias, ignore_eos, ...)."""

    def __init__(self, **data: Any) -> None:
        # Checked here rather than in a validator, so errors reach the caller typed (pydantic
        # wraps a ValueError raised in a validator into its ValidationError).
        super().__init__(**adapter_keywords(
            "LlamaEngineLLM", data, type(self).model_fields, sampling=True))
        check_engine_options("LlamaEngineLLM", self.engine, self.engine_options)
        if self.engine is None:
            self.engine = shared_engine(self.model or DEFAULT_MODEL,
                                        options=self.engine_options)
        if self.model is None:
            self.model = self.engine.model.name
        self._params({})  # fail at construction on bad sampling values

    @property
    def _engine(self) -> LlamaEngine:
        assert self.engine is not None  # set in __init__
        return self.engine

    @classmethod
    def class_name(cls) -> str:
        return "LlamaEngineLLM"

    @property
    def metadata(self) -> LLMMetadata:
        model = self._engine.model
        return LLMMetadata(
            context_window=self.context_window or model.context_length,
            num_output=self.max_tokens,
            is_chat_model=model.has_chat_template,
            is_function_calling_model=True,
            model_name=model.name,
        )

    # -- tools ----------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`chat` keywords for a reply that may call `tools` (must, with `tool_required`; a
        `tool_choice` naming a tool must call that one)."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg)
                            if isinstance(user_msg, str) else user_msg)
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools],
                "tool_choice": tool_choice, **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls in a reply (its `ToolCallBlock`s)."""
        calls = [ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name,
                               tool_kwargs=b.tool_kwargs)
                 for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise GenerationError(
                "the reply calls no tool; pass tool_required=True (tool_choice='required') to "
                "make the model call one")
        return calls

    # -- chat -----------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        *_, last = self._chat_gen(messages, kwargs)
        return last

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_gen(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _last(self._achat_gen(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return self._achat_gen(messages, kwargs)

    # -- completion -----------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        *_, last = self._complete_gen(prompt, formatted, kwargs)
        return last

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return self._complete_gen(prompt, formatted, kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await _last(self._acomplete_gen(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return self._acomplete_gen(prompt, formatted, kwargs)

    # -- the generators behind them (checked eagerly, run lazily) -------------------------------
    def _chat_gen(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        stream = self._chat_stream(messages, kwargs)

        def gen() -> ChatResponseGen:
            reply = _Reply()
            try:
                for chunk in stream:
                    yield reply.add(chunk)
            finally:
                stream.close()

        return gen()

    def _achat_gen(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> ChatResponseAsyncGen:
        stream = self._chat_stream(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            reply = _Reply()
            try:
                async for chunk in stream:
                    yield reply.add(chunk)
            finally:
                stream.close()

        return gen()

    def _complete_gen(
        self, prompt: str, formatted: bool, kwargs: dict[str, Any]
    ) -> CompletionResponseGen:
        stream = self._engine.stream(self._prompt(prompt, formatted), params=self._params(kwargs))

        def gen() -> CompletionResponseGen:
            text = ""
            try:
                for chunk in stream:
                    text += chunk.text
                    yield _completion_response(text, chunk)
            finally:
                stream.close()

        return gen()

    def _acomplete_gen(
        self, prompt: str, formatted: bool, kwargs: dict[str, Any]
    ) -> CompletionResponseAsyncGen:
        stream = self._engine.astream(self._prompt(prompt, formatted), params=self._params(kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            try:
                async for chunk in stream:
                    text += chunk.text
                    yield _completion_response(text, chunk)
            finally:
                stream.close()

        return gen()

    # -- helpers --------------------------------------------------------------------------------
    def _params(self, overrides: dict[str, Any]) -> SamplingParams:
        fields = {k: getattr(self, k) for k in _SAMPLING_FIELDS}
        merged = {k: v for k, v in fields.items() if v is not None}
        merged = {**merged, **self.sampling, **overrides}
        if merged.get("stop") is not None:
            merged["stop"] = tuple(merged["stop"])
        return SamplingParams.from_kwargs(**merged)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted or self.completion_to_prompt is None else (
            self.completion_to_prompt(prompt))

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
                     ) -> TokenStream:
        kwargs = dict(kwargs)
        tools, tool_choice = kwargs.pop("tools", None), kwargs.pop("tool_choice", None)
        return self._engine.stream_chat(
            [_to_openai(m, n) for n, m in enumerate(messages)], tools=tools,
            tool_choice=tool_choice, params=self._params(kwargs))


def _to_openai(message: ChatMessage, n: int) -> dict[str, Any]:
    other = [b for b in message.blocks if not isinstance(b, TextBlock | ToolCallBlock)]
    if other:
        raise UnsupportedOperationError(
            f"message {n} holds a {type(other[0]).__name__}, but llama-engine models read text "
            "only; send the text alone")
    role = _ROLES.get(message.role, message.role.value)
    if role not in ("system", "user", "assistant", "tool"):
        raise InvalidParamsError(f"message {n} has role {role!r}; use system, user or assistant")
    out: dict[str, Any] = {"role": role, "content": message.content or ""}
    calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if calls:
        out["tool_calls"] = [{"id": b.tool_call_id, "type": "function", "function": {
            "name": b.tool_name, "arguments": b.tool_kwargs}} for b in calls]
    if role == "tool" and "tool_call_id" in message.additional_kwargs:
        out["tool_call_id"] = message.additional_kwargs["tool_call_id"]
    return out


class _Reply:
    """A chat reply as it streams: each chunk's response holds the whole reply so far (text,
    then the calls made), the delta, and on the last one the usage."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[ToolCallBlock] = []

    def add(self, chunk: StreamChunk) -> ChatResponse:
        self.text += chunk.text
        self.calls += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name,
                                     tool_kwargs=c.arguments) for c in chunk.tool_calls or ()]
        blocks: list[Any] = [TextBlock(text=self.text)] if self.text or not self.calls else []
        extra = ({} if chunk.usage is None else _usage(chunk.usage, chunk.finish_reason))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT,
                                                blocks=[*blocks, *self.calls]),
                            delta=chunk.text, additional_kwargs=extra)


def _completion_response(text: str, chunk: StreamChunk) -> CompletionResponse:
    extra = _usage(chunk.usage, chunk.finish_reason) if chunk.usage is not None else {}
    return CompletionResponse(text=text, delta=chunk.text, additional_kwargs=extra)


async def _last(responses: AsyncIterator[Any]) -> Any:
    """The last of a stream of responses: it holds the whole reply and the usage."""
    last = None
    async for last in responses:  # noqa: B007
        pass
    assert last is not None, "a reply always ends with a response"
    return last


def _usage(usage: Usage, finish_reason: str | None) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens,
            "finish_reason": finish_reason}


class LlamaEngineEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from `LlamaEngine.embed`, `embed_batch_size` texts per call.

    Pass `engine=` (`create_engine(embed_model="all-minilm-l6-v2")` names its encoder), or
    `model_name=` alone (default "all-minilm-l6-v2"): an embeddings-only engine for it is built
    once per process and shared by every adapter naming the same model and `engine_options`
    (see `adapters._shared`). Queries and documents are embedded alike; the async forms run in
    a worker thread. An unknown keyword raises InvalidParamsError listing the allowed ones.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: LlamaEngine | None = Field(default=None, exclude=True)
    """The engine that embeds; built from `model_name` when not given."""
    engine_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """`create_engine` keywords for an engine built from `model_name`; not with `engine=`."""
    embed_batch_size: int = Field(default=32, gt=0, le=2048)

    def __init__(self, **data: Any) -> None:
        super().__init__(**adapter_keywords(
            "LlamaEngineEmbedding", data, type(self).model_fields, sampling=False))
        check_engine_options("LlamaEngineEmbedding", self.engine, self.engine_options)
        if self.engine is None:
            if self.model_name == "unknown":  # BaseEmbedding's default: none was named
                self.model_name = DEFAULT_EMBED_MODEL
            self.engine = shared_engine(None, embed_model=self.model_name,
                                        options=self.engine_options)

    @property
    def _engine(self) -> LlamaEngine:
        assert self.engine is not None  # set in __init__
        return self.engine

    @classmethod
    def class_name(cls) -> str:
        return "LlamaEngineEmbedding"

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._engine.embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._engine.embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._engine.embed(texts) if texts else []

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
