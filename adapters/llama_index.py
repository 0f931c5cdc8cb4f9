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
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.llm import LLM
    from pydantic import ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.llama_index", "llama-index", e) from e

from adapters._chat import ChatCall, Final
from adapters._shared import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_MODEL,
    adapter_keywords,
    check_engine_options,
    shared_engine,
)
from llama_engine import (
    InvalidParamsError,
    LlamaEngine,
    SamplingParams,
    StreamChunk,
    UnsupportedOperationError,
    Usage,
)

__all__ = ["LlamaEngineEmbedding", "LlamaEngineLLM"]

# The SamplingParams fields LlamaEngineLLM declares (the rest go in `sampling`).
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "seed", "stop", "timeout")
_ROLES = {MessageRole.DEVELOPER: "system", MessageRole.CHATBOT: "assistant",
          MessageRole.MODEL: "assistant", MessageRole.FUNCTION: "tool"}


class LlamaEngineLLM(LLM):
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
            model_name=model.name,
        )

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
        events = self._chat_call(messages, kwargs).events()

        def gen() -> ChatResponseGen:
            text = ""
            try:
                for event in events:
                    text, response = _chat_response(text, event)
                    if response is not None:
                        yield response
            finally:
                events.close()

        return gen()

    def _achat_gen(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> ChatResponseAsyncGen:
        events = self._chat_call(messages, kwargs).aevents()

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            try:
                async for event in events:
                    text, response = _chat_response(text, event)
                    if response is not None:
                        yield response
            finally:
                await events.aclose()

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

    def _chat_call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatCall:
        return ChatCall(self._engine, [_to_openai(m, n) for n, m in enumerate(messages)],
                        params=self._params(kwargs))


def _to_openai(message: ChatMessage, n: int) -> dict[str, Any]:
    other = [b for b in message.blocks if not isinstance(b, TextBlock)]
    if other:
        raise UnsupportedOperationError(
            f"message {n} holds a {type(other[0]).__name__}, but llama-engine models read text "
            "only; send the text alone")
    role = _ROLES.get(message.role, message.role.value)
    if role not in ("system", "user", "assistant", "tool"):
        raise InvalidParamsError(f"message {n} has role {role!r}; use system, user or assistant")
    return {"role": role, "content": message.content or ""}


def _chat_response(text: str, event: object) -> tuple[str, ChatResponse | None]:
    if isinstance(event, str):
        text += event
        return text, ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=event)
    if isinstance(event, Final):
        return text, ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="",
            additional_kwargs=_usage(event.usage, event.finish_reason))
    return text, None  # no tools are offered, so no tool calls come back


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
