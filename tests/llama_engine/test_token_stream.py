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
