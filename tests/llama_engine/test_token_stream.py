"""The stream's own mechanics: exhaustion, close from another thread, async cancellation.

The steps here are a plain generator, because what is under test is TokenStream itself; the
engine's streams are tested with the real model in tests/llama_runtime.
"""

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

from llama_engine import StreamChunk, TokenStream, Usage
from llama_engine.stream import Outbox


def _counting(n: int, cleaned: list[str], delay: float = 0.0):
    def factory(cancel: threading.Event) -> Iterator[StreamChunk]:
        try:
            for i in range(n):
                if cancel.is_set():
                    return
                time.sleep(delay)
                last = i == n - 1
                yield StreamChunk(text=str(i), token_id=i, finish_reason="length" if last else None,
                                  usage=Usage(completion_tokens=n) if last else None)
        finally:
            cleaned.append("done")

    return factory


def test_exhausting_collects_everything_and_cleans_up() -> None:
    cleaned: list[str] = []
    c = TokenStream(_counting(5, cleaned)).collect()
    assert c.text == "01234" and c.token_ids == [0, 1, 2, 3, 4]
    assert c.finish_reason == "length" and c.usage.completion_tokens == 5
    assert cleaned == ["done"]


def test_break_then_close_runs_cleanup_once() -> None:
    cleaned: list[str] = []
    s = TokenStream(_counting(100, cleaned))
    for chunk in s:
        if chunk.token_id == 3:
            break
    s.close()
    s.close()
    assert cleaned == ["done"] and s.finish_reason == "cancelled"
    assert list(s) == []


def test_close_from_another_thread_while_a_step_runs() -> None:
    cleaned: list[str] = []
    s = TokenStream(_counting(1000, cleaned, delay=0.01))
    got: list[int] = []

    def consume() -> None:
        for c in s:
            got.append(c.token_id or 0)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.05)
    s.close()
    t.join(timeout=2)
    assert not t.is_alive()
    assert cleaned == ["done"] and len(got) < 1000


def test_cancelling_the_consuming_task_closes_the_stream() -> None:
    cleaned: list[str] = []
    s = TokenStream(_counting(1000, cleaned, delay=0.01))

    async def consume() -> None:
        async for _ in s:
            pass

    async def main() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):  # the step in flight finishes in its worker thread
            if cleaned:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert cleaned == ["done"] and s.cancelled


def _outbox_stream(n: int, cleaned: list[str], *, start: threading.Event | None = None,
                   errors: list[BaseException] | None = None
                   ) -> tuple[TokenStream, threading.Thread]:
    """A stream whose chunks a producer thread puts in an Outbox, as the scheduler does; the
    producer starts when the first step submits (like a request), or once `start` is set. Every
    step after the first reads without waiting (`get(timeout=0)`), so a step taken before its
    chunk arrived fails the stream."""
    outbox = Outbox()

    def produce() -> None:
        try:
            if start is not None:
                start.wait(10)
            for i in range(n):
                time.sleep(0.002)
                last = i == n - 1
                outbox.put(StreamChunk(text=str(i), token_id=i,
                                       finish_reason="length" if last else None))
            outbox.put(None)
        except BaseException as e:  # a failing producer is a failing test
            if errors is not None:
                errors.append(e)
            raise

    producer = threading.Thread(target=produce)

    def factory(cancel: threading.Event) -> Iterator[StreamChunk]:
        producer.start()
        try:
            item = outbox.get()
            while item is not None:
                yield item
                item = outbox.get(timeout=0)
        finally:
            cleaned.append("done")

    return TokenStream(factory, outbox), producer


def test_outbox_wakes_a_waiter_once_whether_the_item_came_first_or_not() -> None:
    box, woken = Outbox(), []
    box.when_ready(lambda: woken.append("later"))
    assert woken == [] and not box.ready()
    box.put(1)
    box.put(2)  # the waiter was called once, then dropped
    assert woken == ["later"] and box.ready()
    box.when_ready(lambda: woken.append("now"))  # an item waits: called at once
    assert woken == ["later", "now"]
    assert (box.get(), box.get()) == (1, 2)
    box.put(None)
    assert box.ends_next() and box.get() is None and not box.ends_next()


def test_a_failing_wake_does_not_stop_the_producer() -> None:
    box = Outbox()

    def broken() -> None:
        raise ValueError("a reader's bug")

    box.when_ready(broken)
    box.put(1)  # logged, not raised into the producing thread
    assert box.get(timeout=0) == 1


def test_async_steps_of_an_outbox_stream_wait_on_the_loop_not_in_threads(monkeypatch) -> None:
    """Only the first step (which submits the request) and the last (whose clean-up may wait)
    run in a worker thread; every chunk between is awaited on the loop, woken by the producer,
    and read only once it is there."""
    cleaned: list[str] = []
    s, producer = _outbox_stream(40, cleaned)
    in_threads = []
    original = asyncio.BaseEventLoop.run_in_executor

    def counting(self, executor, func, *args):  # type: ignore[no-untyped-def]
        in_threads.append(func)
        return original(self, executor, func, *args)

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counting)

    async def main() -> list[str]:
        texts = [c.text async for c in s]
        # an exhausted stream stays exhausted, at once
        with contextlib.suppress(StopAsyncIteration):
            await asyncio.wait_for(s.__anext__(), 1)
            raise AssertionError("a step after the end returned a chunk")
        return texts

    assert asyncio.run(main()) == [str(i) for i in range(40)]
    producer.join()
    assert len(in_threads) == 2 and cleaned == ["done"] and s.finish_reason == "length"


def test_cancelling_a_task_waiting_on_an_outbox_closes_the_stream() -> None:
    """The producer goes on putting after the reader's task was cancelled and its loop closed:
    neither the stale waiter nor the closed loop may fail it."""
    cleaned: list[str] = []
    errors: list[BaseException] = []
    start = threading.Event()
    s, producer = _outbox_stream(50, cleaned, start=start, errors=errors)

    async def main() -> None:
        got = []

        async def consume() -> None:
            async for c in s:
                got.append(c)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the first step waits in its thread for the producer
        start.set()
        while len(got) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    producer.join()
    assert errors == [] and cleaned == ["done"] and s.cancelled
