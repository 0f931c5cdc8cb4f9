"""Stop conditions: stop strings over streamed text, and stop token ids."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from llama_engine.errors import InvalidParamsError
from llama_engine.params import SamplingParams

__all__ = ["StopChecker", "is_stop_token"]


class StopChecker:
    """Finds stop strings in streamed text, even when one is split across tokens.

    `push` each text delta; it returns the text that is safe to emit now and whether a stop
    string has been seen. Invariants:
      - the held-back text is the longest tail of the stream that is a proper prefix of some stop
        string, so no stop string can begin in text already emitted;
      - a stop string is never emitted; on a match, only the text before it is returned;
      - the first stop string to be completed wins (the earliest end; of those, the one that
        starts first), so the result does not depend on how the text was split into deltas.
    Call `flush` at the end of generation to get the held-back text. After a stop, `push` and
    `flush` return nothing.
    """

    __slots__ = ("_held", "_stopped", "_stops")

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidParamsError(f"stop must hold non-empty strings, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop))
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen."""
        return self._stopped

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Add `text_delta`; return (text safe to emit now, whether generation must stop)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text_delta, False
        buf = self._held + text_delta
        best: tuple[int, int] | None = None  # (end, start) of the first completed stop string
        for s in self._stops:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            self._held, self._stopped = "", True
            return buf[: best[1]], True
        hold = self._partial_len(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Return the held-back text (end of generation) and clear it."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _partial_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


def is_stop_token(token_id: int, params: SamplingParams, eog_ids: Collection[int]) -> bool:
    """Whether `token_id` ends generation: a requested stop id, or an end-of-generation id
    of the model (`eog_ids`) unless `params.ignore_eos`."""
    return token_id in params.stop_token_ids or (
        not params.ignore_eos and token_id in eog_ids)
