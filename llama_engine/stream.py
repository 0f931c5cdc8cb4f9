"""`TokenStream`: one request's tokens, as an iterator and as an async iterator.

The engine hands in a factory that builds the generator of steps from a cancellation event. The
generator checks the event once per step and runs its own clean-up (freeing the session's KV) in
a `finally`, so every way of stopping -- exhausting it, `close()`, `break`, garbage collection,
cancelling the asyncio task that awaits it -- ends in the same place.

Stepping and closing may come from different threads (an async consumer steps in a worker thread
while the event loop cancels). A lock serialises steps; `close()` never blocks: if a step is under
way, whoever holds the lock closes the generator as it lets go.

An engine whose generator reads its chunks from an `Outbox` hands that in too: async iteration
then waits on the event loop for the next chunk to arrive (one wake-up from the producing thread)
and steps on the loop only once it is there, instead of blocking a worker thread a chunk. Steps
that may block still run in a worker thread: the first (it submits the request), the last (its
clean-up waits until the scheduler has freed the request), one while another thread holds the
stream, and every step of a stream without an Outbox or passed through `pipe` (which may read
several chunks before it yields one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llama_engine.types import (
    Completion,
    FinishReason,
    InvalidToolCall,
    StreamChunk,
    ToolCall,
    Usage,
)

__all__ = ["Outbox", "TokenStream"]

log = logging.getLogger(__name__)

StepFactory = Callable[[threading.Event], Iterator[StreamChunk]]

_WAITERS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="llama-stream")
"""Where async iteration waits for each next chunk: a thread per stream that is waiting, made
as needed. (asyncio's default executor has min(32, cores + 4) threads: with more streams
than that, the rest would wait for a thread, not for their tokens.)"""


class Outbox:
    """What a producing thread (the scheduler) hands one request's reader: a queue with a
    blocking `get` for threads, and `when_ready` for an event loop, which is called back from the
    producer instead of keeping a thread blocked on `get`. None ends the stream, and so does an
    exception (the reader raises it)."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._wake: Callable[[], None] | None = None

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            wake, self._wake = self._wake, None
        if wake is not None:
            try:
                wake()
            except Exception:  # the producer (the scheduler) must go on whatever a reader did
                log.exception("waking a stream's reader failed")

    def get(self, timeout: float | None = None) -> Any:
        """The next item, waiting for it (raises queue.Empty after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._items.popleft()

    def ready(self) -> bool:
        return bool(self._items)

    def ends_next(self) -> bool:
        """Whether the next item ends the stream (None, or an error)."""
        with self._cond:
            return bool(self._items) and (self._items[0] is None
                                          or isinstance(self._items[0], BaseException))

    def when_ready(self, wake: Callable[[], None]) -> None:
        """Call `wake()` once an item is waiting: now if one is, else from the next `put`'s
        thread (one waiter at a time: a later call replaces an earlier one)."""
        with self._cond:
            if not self._items:
                self._wake = wake
                return
        wake()

    def forget(self) -> None:
        """Drop the waiting `wake` (its reader went away)."""
        with self._cond:
            self._wake = None


class TokenStream(Iterator[StreamChunk], AsyncIterator[StreamChunk]):
    """The chunks of one generation request.

    Iterate it (`for chunk in stream`) or async-iterate it (`async for chunk in stream`), not
    both at once. The last chunk carries `finish_reason` and `usage`. Closing it (or breaking
    out of the loop, or cancelling the task) stops generation within one step and frees the
    session's KV blocks.
    """

    def __init__(self, factory: StepFactory, outbox: Outbox | None = None) -> None:
        self._cancel = threading.Event()
        self._gen = factory(self._cancel)
        self._outbox = outbox
        """Where the generator reads its chunks, once it has started (the first step submits
        the request): async steps then wait for a chunk on the loop, not in a thread."""
        self._started = False
        self._lock = threading.Lock()
        self._close_requested = False
        self._finished = False
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None

    # -- sync ---------------------------------------------------------------------------------
    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> StreamChunk:
        chunk = self._step(blocking=True)
        assert chunk is not None
        return chunk

    def _step(self, *, blocking: bool) -> StreamChunk | None:
        """The next chunk; None, having done nothing, when not `blocking` and another thread
        is stepping or closing the stream."""
        try:
            if not self._lock.acquire(blocking=blocking):
                return None
            try:
                if self._finished:
                    raise StopIteration
                try:
                    self._started = True
                    chunk = next(self._gen)
                except StopIteration:
                    self._finished = True
                    raise
                except BaseException:
                    self._finished = True
                    self._gen.close()
                    raise
                if chunk.finish_reason is not None:
                    self.finish_reason = chunk.finish_reason
                    self.usage = chunk.usage
                return chunk
            finally:
                self._lock.release()
        finally:
            if self._close_requested:
                self._try_finish()

    def close(self) -> None:
        """Stop generating; frees the session's KV. Safe from any thread, never blocks."""
        self._close_requested = True
        self._cancel.set()
        self._try_finish()

    def _try_finish(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a step is running; its holder calls us again as it lets go
        try:
            if not self._finished:
                self._finished = True
                if self.finish_reason is None:
                    self.finish_reason = "cancelled"
                self._gen.close()
        finally:
            self._lock.release()

    def pipe(
        self, through: Callable[[Iterator[StreamChunk]], Iterator[StreamChunk]]
    ) -> TokenStream:
        """Pass the chunks through `through` (for engines: e.g. taking tool calls out of the
        text), before the first is read; closing the stream closes both. Returns self."""
        inner = self._gen
        self._outbox = None  # `through` may read several chunks before it yields one

        def piped() -> Iterator[StreamChunk]:
            try:
                yield from through(inner)
            finally:
                inner.close()

        self._gen = piped()
        return self

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.close()

    # -- async --------------------------------------------------------------------------------
    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> StreamChunk:
        outbox = self._outbox
        try:
            loop = asyncio.get_running_loop()
            if self._finished:
                raise StopAsyncIteration
            if outbox is not None and self._started and not self._close_requested:
                if not outbox.ready():
                    arrived: asyncio.Future[None] = loop.create_future()
                    outbox.when_ready(lambda: _resolve_from_thread(loop, arrived))
                    await arrived
                # a chunk is waiting, so stepping does not block the loop -- unless another
                # thread holds the stream (then _step returns None) or the chunk ends the
                # stream, whose clean-up waits for the scheduler to free the request: a thread
                if not outbox.ends_next():
                    try:
                        chunk = self._step(blocking=False)
                    except StopIteration:
                        raise StopAsyncIteration from None
                    if chunk is not None:
                        return chunk
            return await loop.run_in_executor(_WAITERS, self._next_or_none_wrapped)
        except StopAsyncIteration:
            raise
        except asyncio.CancelledError:
            if outbox is not None:
                outbox.forget()
            self.close()
            raise

    def _next_or_none_wrapped(self) -> StreamChunk:
        try:
            return next(self)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.close()

    # -- collecting ---------------------------------------------------------------------------
    def collect(self) -> Completion:
        """Run to the end and return the whole `Completion`."""
        return _collect(iter(self), self)

    async def acollect(self) -> Completion:
        parts: list[StreamChunk] = [c async for c in self]
        return _collect(iter(parts), self)


def _resolve(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)


def _resolve_from_thread(loop: asyncio.AbstractEventLoop, f: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
        loop.call_soon_threadsafe(_resolve, f)


def _collect(chunks: Iterator[StreamChunk], stream: TokenStream) -> Completion:
    text: list[str] = []
    ids: list[int] = []
    logprobs: list[float] = []
    tops: list[dict[int, float]] = []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    finish: FinishReason = "cancelled"
    usage = Usage()
    for c in chunks:
        text.append(c.text)
        calls += c.tool_calls or ()
        invalid += c.invalid_tool_calls or ()
        if c.token_id is not None:
            ids.append(c.token_id)
            if c.logprob is not None:
                logprobs.append(c.logprob)
            if c.top_logprobs is not None:
                tops.append(c.top_logprobs)
        if c.finish_reason is not None:
            finish = c.finish_reason
            usage = c.usage or usage
    return Completion(
        text="".join(text),
        token_ids=ids,
        finish_reason=finish,
        usage=usage,
        logprobs=logprobs or None,
        top_logprobs=tops or None,
        tool_calls=calls,
        invalid_tool_calls=invalid,
    )
