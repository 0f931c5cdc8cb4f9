"""Plain value types that cross the narrow waist: specs, handles, sessions, results, chunks."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_engine.errors import InvalidParamsError, SessionError

__all__ = [
    "Completion",
    "FinishReason",
    "InvalidToolCall",
    "ModelHandle",
    "ModelSpec",
    "PrefillResult",
    "Session",
    "StreamChunk",
    "ToolCall",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What to load: a registered model name or a path, and how.

    `context_length` caps the context (None: the model's own, which may be large: the KV cache
    grows on demand). `dtype` is the compute dtype ("auto": float32 on CPU, bfloat16 on CUDA).
    """

    model: str
    context_length: int | None = None
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidParamsError(f"model must be a non-empty name or path, got {self.model!r}")
        if self.context_length is not None and (
            not isinstance(self.context_length, int) or self.context_length < 1
        ):
            raise InvalidParamsError(
                f"context_length must be a positive integer or None, got {self.context_length!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InvalidParamsError(
                f"dtype must be one of auto, float32, float16, bfloat16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda", "metal") and not self.device.startswith(
            "cuda:"
        ):
            raise InvalidParamsError(
                f"device must be auto, cpu, cuda[:N] or metal, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class ModelHandle:
    """What was loaded: enough for a caller to reason about limits without backend access."""

    name: str
    path: str
    architecture: str
    vocab_size: int
    context_length: int
    n_params: int
    quant_types: Mapping[str, int]
    """Storage type name -> number of tensors stored that way in the file."""
    has_chat_template: bool
    eos_token_ids: tuple[int, ...]
    backend: str
    device: str
    dtype: str


_session_ids = itertools.count(1)


class Session:
    """One conversation's state in the engine: its token history and (privately) its KV cache.

    Created by `LlamaEngine.new_session()`, released by `close_session()`. A session serves one
    request at a time; `tokens` are the tokens whose keys and values are in the cache. A
    session is a read-only view: the engine's KV cache owns its tokens.
    """

    def __init__(self, session_id: str | None = None) -> None:
        self.id: str = session_id if session_id is not None else f"s{next(_session_ids)}"
        self._context: Callable[[], list[int]] = list
        self.closed = False
        self.backend_state: Any = None
        """Owned by the engine that made the session; callers must not touch it."""
        self.last_prefill: PrefillResult | None = None
        self._busy = threading.Lock()

    @property
    def tokens(self) -> list[int]:
        """The session's context: the tokens whose K/V the cache holds (a copy, read from the
        engine's KV cache; empty once closed)."""
        return self._context()

    def bind(self, context: Callable[[], list[int]] | None) -> None:
        """For engines: where `tokens` is read from (None: nowhere, the session is empty)."""
        self._context = context if context is not None else list

    def acquire(self) -> None:
        """Mark the session in use by one request; a second concurrent request is an error."""
        if self.closed:
            raise SessionError(f"session {self.id} is closed; create a new one with new_session()")
        if not self._busy.acquire(blocking=False):
            raise SessionError(
                f"session {self.id} is already generating; wait for that request to finish "
                "(or cancel it) before starting another on the same session")

    def release(self) -> None:
        if self._busy.locked():
            self._busy.release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tokens)} tokens"
        return f"Session({self.id!r}, {state})"


@dataclass(frozen=True, kw_only=True)
class PrefillResult:
    """The outcome of prefill: how many tokens were computed and how many came from the cache."""

    num_tokens: int
    """The session's context length after prefill."""
    cached_tokens: int
    """Leading tokens whose KV was reused rather than computed."""
    prefill_seconds: float
    started_at: float
    """`time.perf_counter()` when prefill started (TTFT is measured from here)."""

    @property
    def computed_tokens(self) -> int:
        return self.num_tokens - self.cached_tokens


@dataclass(kw_only=True)
class Usage:
    """Token counts and timings of one request."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes from prefill's logits; the rest each cost one decode step.
        steps = self.completion_tokens - 1
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 and steps > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """A call the model made: the tool's name and its arguments (a JSON object)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class InvalidToolCall:
    """Text the model meant as a tool call that does not parse: `text` is what it wrote (also
    in the reply's text), `error` says what is wrong."""

    id: str
    name: str | None
    text: str
    error: str


@dataclass(kw_only=True)
class StreamChunk:
    """One step of a stream: the text delta and the token that made it.

    `text` may be empty (a token that ends inside a UTF-8 character, or text held back because it
    may start a stop string, or a tool call being written). The last chunk has `finish_reason`
    and `usage` set; its `token_id` is None when it only flushes held-back text.

    In a chat with tools, a call comes in `tool_calls` on the chunk whose token closed it (its
    text is not in `text`); a call that does not parse comes in `invalid_tool_calls` and its
    text in `text`.
    """

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tool_calls: list[ToolCall] | None = None
    invalid_tool_calls: list[InvalidToolCall] | None = None


@dataclass(kw_only=True)
class Completion:
    """A finished request: the generated text and ids (prompt excluded), why it ended, usage.

    A chat with tools returns the calls the model made in `tool_calls` (finish reason
    "tool_calls") and its other text in `text`; a reply that looks like a call but does not
    parse stays in `text`, with the reason in `invalid_tool_calls`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    error: str | None = field(default=None)
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
