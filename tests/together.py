"""Run calls in threads released at once, so an engine's scheduler batches them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_once(fn: Callable[[int], T], n: int) -> list[T]:
    """fn(0) .. fn(n - 1), each in its own thread, all started together; their results in
    order (an exception in one is raised here)."""
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
