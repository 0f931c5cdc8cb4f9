"""What every backend's compute shares, without torch: the process-wide compute lock, and the
checks of `embed()`'s arguments."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from llama_engine import InvalidParamsError

__all__ = ["COMPUTE_LOCK", "DEFAULT_BATCH_SIZE", "FairLock", "check_options", "check_texts"]

DEFAULT_BATCH_SIZE = 32
"""Texts embedded per forward."""


def check_texts(texts: Any) -> list[str]:
    """`texts` as a list of str, or InvalidParamsError saying what is wrong."""
    if isinstance(texts, str | bytes):
        raise InvalidParamsError(
            f"texts must be a list of str, got a single {type(texts).__name__}; wrap it in a "
            "list: embed([text])")
    if not isinstance(texts, Sequence):
        raise InvalidParamsError(f"texts must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidParamsError(
                f"texts[{i}] must be a str, got {type(t).__name__}; embed only text")
    return list(texts)


def check_options(truncate: Any, batch_size: Any) -> None:
    if not isinstance(truncate, bool):
        raise InvalidParamsError(f"truncate must be True or False, got {truncate!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParamsError(f"batch_size must be a positive integer, got {batch_size!r}")



class FairLock:
    """A first-come, first-served lock. The engine's forward lock is one: a caller embedding
    many batches in a row cannot starve the scheduler thread waiting for its next step (a plain
    Lock may be re-taken by the thread that just released it). Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


COMPUTE_LOCK = FairLock()
"""Held by every forward in the process: each engine's scheduler steps and every embedding
batch. One forward already uses every core (OpenMP teams that spin-wait at each barrier); two at
once oversubscribe the cores and every barrier then waits out a time slice, which slowed decode
about 100x in a measurement here. Taking turns loses nothing: each forward is compute-bound."""
