"""`LlamaEngine`: the narrow waist every application and adapter depends on.

Six operations are the contract (load_model, tokenize, detokenize, prefill, decode, embed), plus
session bookkeeping and the chat template. Everything users call day to day -- `generate`,
`stream`, `chat` and their async twins -- is written here once, on top of those.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from llama_engine.errors import ContextOverflowError, InvalidParamsError
from llama_engine.params import SamplingParams
from llama_engine.stream import TokenStream
from llama_engine.tools import plan_chat, split_tool_calls
from llama_engine.types import (
    Completion,
    ModelHandle,
    ModelSpec,
    PrefillResult,
    Session,
    StreamChunk,
)

__all__ = ["ChatMessage", "LlamaEngine"]

ChatMessage = Mapping[str, Any]
"""An OpenAI-style message: {"role": "user", "content": "..."} (plus tool fields if any)."""


class LlamaEngine(ABC):
    """A loaded model that tokenizes, prefills sessions, decodes tokens and embeds text."""

    # -- the contract ---------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, spec: ModelSpec) -> ModelHandle:
        """Load (or replace) the engine's model; returns what was loaded."""

    @property
    @abstractmethod
    def model(self) -> ModelHandle:
        """The loaded model."""

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS as the model's tokenizer asks."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `tokens`; raises InvalidTokenError for ids outside the vocabulary."""

    @abstractmethod
    def prefill(self, session: Session, tokens: Sequence[int]) -> PrefillResult:
        """Make `tokens` the session's context, computing KV for all but the longest prefix
        already cached for this session. Appending is `prefill(s, s.tokens + more)`."""

    @abstractmethod
    def decode(self, session: Session, params: SamplingParams) -> TokenStream:
        """Generate from the end of the session's context, one chunk per token."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One embedding vector per text."""

    def embed_token_counts(self, texts: Sequence[str], *, truncate: bool = True) -> list[int]:
        """How many tokens `embed` reads of each text (for usage reports). This default counts
        with the generating model's tokenizer; engines with a separate encoder override it."""
        return [len(self.tokenize(t, add_special=True)) for t in texts]

    @property
    def embed_model_name(self) -> str | None:
        """The name of what `embed` runs, if the engine knows it."""
        return None

    @abstractmethod
    def new_session(self) -> Session:
        """A fresh, empty session."""

    @abstractmethod
    def close_session(self, session: Session) -> None:
        """Release the session's KV cache; the session cannot be used again."""

    @abstractmethod
    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render OpenAI-style messages with the model's chat template."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters: at least kv_blocks_total/free/cached and sessions_active."""

    # -- conveniences ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> Completion:
        """Raw completion of `prompt` (no chat template). Sampling keywords are the fields of
        `SamplingParams`; `temperature=0` is greedy."""
        return self.stream(prompt, params=params, session=session, **sampling).collect()

    async def agenerate(
        self,
        prompt: str | Sequence[int],
        *,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> Completion:
        return await self.stream(prompt, params=params, session=session, **sampling).acollect()

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """Like `generate`, but a `TokenStream` of chunks (iterate it, or `async for` it).

        With `session`, the prompt is the whole context: the part the session already holds is
        not computed again. Without, a temporary session is made and closed at the end.
        """
        tokens = self._prompt_tokens(prompt, add_special=True)
        return self._stream_tokens(tokens, self._params(params, sampling), session)

    astream = stream
    """`async for chunk in engine.astream(...)`: the same TokenStream, iterated asynchronously."""

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        chat_template: str | None = None,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> Completion:
        """Reply to OpenAI-style `messages`, rendered with the model's chat template (or
        `chat_template`). Pass the same `session` each turn and earlier turns are not prefilled
        again.

        `tools` (OpenAI tool dicts) offers tools; `tool_choice` is "auto" (the default: the
        model writes text or calls), "required", "none" or {"type": "function", "function":
        {"name": ...}}. Calls come back in `Completion.tool_calls`, their arguments
        constrained to the tool's schema (see `llama_engine.tools`)."""
        return self.stream_chat(messages, tools=tools, tool_choice=tool_choice,
                                chat_template=chat_template, params=params, session=session,
                                **sampling).collect()

    async def achat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        chat_template: str | None = None,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> Completion:
        return await self.stream_chat(
            messages, tools=tools, tool_choice=tool_choice, chat_template=chat_template,
            params=params, session=session, **sampling).acollect()

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        chat_template: str | None = None,
        params: SamplingParams | None = None,
        session: Session | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """`chat`, streamed: a TokenStream of chunks (sync or async); each tool call arrives on
        the chunk that completes it (`StreamChunk.tool_calls`)."""
        plan = plan_chat(self, messages, tools=tools, tool_choice=tool_choice,
                         chat_template=chat_template)
        params = self._params(params, sampling)
        if plan.response_format is not None:
            if params.response_format is not None:
                raise InvalidParamsError(
                    "a chat with tools constrains its calls itself; pass response_format or "
                    "tools, not both (or tool_choice='none')")
            params = replace(params, response_format=plan.response_format)
        tokens = self.tokenize(plan.prompt, add_special=False)
        stream = self._stream_tokens(tokens, params, session)
        if plan.parse_calls:
            stream.pipe(lambda chunks: split_tool_calls(chunks, plan.prefix, plan.names))
        return stream

    astream_chat = stream_chat

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _params(params: SamplingParams | None, sampling: Mapping[str, Any]) -> SamplingParams:
        if params is not None and sampling:
            raise InvalidParamsError(
                f"pass either params= or sampling keywords, not both (got {sorted(sampling)})")
        return params if params is not None else SamplingParams.from_kwargs(**sampling)

    def _prompt_tokens(self, prompt: str | Sequence[int], *, add_special: bool) -> list[int]:
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_special=add_special)
        elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
            tokens = list(prompt)
            self.detokenize(tokens)  # validates every id against the vocabulary
        else:
            raise InvalidParamsError(
                f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        if not tokens:
            raise InvalidParamsError("prompt is empty; give at least one token of text")
        return tokens

    def _stream_tokens(
        self, tokens: list[int], params: SamplingParams, session: Session | None
    ) -> TokenStream:
        ctx = self.model.context_length
        if len(tokens) >= ctx:
            raise ContextOverflowError(
                f"prompt is {len(tokens)} tokens but the context is {ctx}; shorten the prompt "
                "or load the model with a larger context_length=")
        own = session is None
        if session is not None:
            session.acquire()  # fail now, in the caller's frame, if it is busy or closed
            session.release()

        def steps(cancel: threading.Event) -> Iterator[StreamChunk]:
            s = self.new_session() if own else session
            assert s is not None
            s.acquire()
            try:
                self.prefill(s, tokens)
                inner = self.decode(s, params)
                try:
                    for chunk in inner:
                        if cancel.is_set():
                            return
                        yield chunk
                finally:
                    inner.close()
            finally:
                s.release()
                if own:
                    self.close_session(s)

        return TokenStream(steps)
