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


def _outbox_stream(n: int, cleaned: list[str]) -> tuple[TokenStream, threading.Thread]:
    """A stream whose chunks a producer thread puts in an Outbox, as the scheduler does; the
    producer starts when the first step submits (like a request)."""
    outbox = Outbox()

    def produce() -> None:
        for i in range(n):
            time.sleep(0.002)
            last = i == n - 1
            outbox.put(StreamChunk(text=str(i), token_id=i,
                                   finish_reason="length" if last else None))
        outbox.put(None)

    producer = threading.Thread(target=produce)

    def factory(cancel: threading.Event) -> Iterator[StreamChunk]:
        producer.start()
        try:
            while (item := outbox.get()) is not None:
                yield item
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


def test_async_steps_of_an_outbox_stream_wait_on_the_loop_not_in_threads(monkeypatch) -> None:
    """Only the first step (which submits the request) runs in a worker thread; every later
    chunk is awaited on the loop, woken by the producer."""
    cleaned: list[str] = []
    s, producer = _outbox_stream(40, cleaned)
    in_threads = []
    original = asyncio.BaseEventLoop.run_in_executor

    def counting(self, executor, func, *args):  # type: ignore[no-untyped-def]
        in_threads.append(func)
        return original(self, executor, func, *args)

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counting)

    async def main() -> list[str]:
        return [c.text async for c in s]

    assert asyncio.run(main()) == [str(i) for i in range(40)]
    producer.join()
    assert len(in_threads) == 1 and cleaned == ["done"] and s.finish_reason == "length"


def test_cancelling_a_task_waiting_on_an_outbox_closes_the_stream() -> None:
    cleaned: list[str] = []
    s, producer = _outbox_stream(200, cleaned)

    async def main() -> None:
        got = []

        async def consume() -> None:
            async for c in s:
                got.append(c)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())  # the loop closes while the producer still puts: it must not fail
    producer.join()
    assert cleaned == ["done"] and s.cancelled
