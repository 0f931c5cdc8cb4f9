"""One scheduler step as the backends receive it: each sequence's share (`SeqStep`), and the
per-row arrays a fused native step reads (`row_arrays`). No torch here: the scheduler and the
torch-free native path use it too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama_models.ops import RopeSpec

__all__ = ["AttentionPlan", "HeadRotary", "RopeTables", "RowArrays", "SeqStep", "WindowPlan",
           "rope_tables", "row_arrays"]


@dataclass(frozen=True, slots=True)
class SeqStep:
    """One sequence's share of a step: `n_new` tokens at positions start..start+n_new-1."""

    start: int
    n_new: int
    write_slots: list[int]
    """Slot of each new token."""
    context_slots: list[int]
    """Slots of positions 0..start+n_new-1 (the new tokens' own slots last)."""
    want_logits: bool
    generated: bool = False
    """The token was sampled from the model (a decode step), not given in a prompt: the fused
    step may compute it in other arithmetic (library.DECODE_MODES). A step lists these first."""


@dataclass(frozen=True, slots=True)
class RowArrays:
    """A step's rows (every sequence's new tokens, in order) as the native step reads them."""

    positions: np.ndarray  # int64 [B]
    write_slots: np.ndarray  # int64 [B]
    block_tables: np.ndarray  # int64 [B, max_blocks]: each row's sequence's blocks
    ctx_lens: np.ndarray  # int64 [B]: position + 1
    logit_rows: np.ndarray  # int64 [R]: the last row of each sequence that wants logits
    generated_rows: int  # rows [0, generated_rows) are generated tokens (SeqStep.generated)


def row_arrays(positions: Sequence[int], seqs: Sequence[SeqStep], block_size: int) -> RowArrays:
    generated = sum(s.generated for s in seqs)
    if any(s.generated for s in seqs[generated:]):
        raise ValueError("a step lists the sequences of generated tokens before the others")
    n_new = np.array([s.n_new for s in seqs])
    tables = [np.asarray(s.context_slots[::block_size], dtype=np.int64) // block_size
              for s in seqs]
    table = np.zeros((len(seqs), max(len(t) for t in tables)), dtype=np.int64)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    pos = np.asarray(positions, dtype=np.int64)
    write = np.fromiter((x for s in seqs for x in s.write_slots), dtype=np.int64,
                        count=len(pos))
    ends = np.cumsum(n_new) - 1
    wanted = np.ascontiguousarray(ends[[s.want_logits for s in seqs]], dtype=np.int64)
    per_row = np.ascontiguousarray(table[np.repeat(np.arange(len(seqs)), n_new)])
    return RowArrays(pos, write, per_row, pos + 1, wanted,
                     int(sum(s.n_new for s in seqs[:generated])))


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray,
                attention_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [len(positions), head_dim / 2] of the rotary angles (times LongRoPE's
    attention factor), computed one way (numpy) for every backend's fused step, so theirs are
    the same bits."""
    angles = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if attention_factor != 1.0:
        factor = np.float32(attention_factor)
        cos, sin = cos * factor, sin * factor
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


class HeadRotary:
    """cos, sin float32 [N, 1, rotary_dim] at `positions` for an op-by-op `rope` over whole
    heads (each half of a head rotates by the same angles), computed by `rope_tables` (the
    fused step's bits); each RopeSpec's frequencies worked out once."""

    def __init__(self) -> None:
        self._inv_freq: dict[int, np.ndarray] = {}  # by id() of the model's RopeSpec

    def __call__(self, positions: np.ndarray, spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
        inv = self._inv_freq.get(id(spec))
        if inv is None:
            inv = self._inv_freq[id(spec)] = np.asarray(spec.inv_freq(), dtype=np.float32)
        cos, sin = rope_tables(np.asarray(positions), inv, spec.attention_factor)
        return (np.concatenate((cos, cos), axis=-1)[:, None, :],
                np.concatenate((sin, sin), axis=-1)[:, None, :])


class RopeTables:
    """A model's rotary tables for the fused step: the global layers' and, when the windowed
    layers have their own base (decoder.local_rope), theirs."""

    def __init__(self, rope: RopeSpec, local: RopeSpec | None) -> None:
        self._specs = [(np.asarray(r.inv_freq(), dtype=np.float32), r.attention_factor)
                       for r in (rope, *(() if local is None else (local,)))]

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """cos, sin of the global table, then (if any) the local table's, at `positions`."""
        return tuple(t for inv, factor in self._specs
                     for t in rope_tables(positions, inv, factor))


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """What a layer of one window (0: global) reads in a step, as numpy: the decode rows'
    context slots [B, W] (padding reads slot 0) and which are real (None: none padded), and
    per prompt chunk the context slots it sees and its mask [n, T] (True: attends)."""

    decode_slots: np.ndarray | None
    decode_valid: np.ndarray | None
    prefills: list[tuple[np.ndarray, np.ndarray]]


class AttentionPlan:
    """A step's rows for attention over paged K/V, planned once a step in numpy for any
    backend: new tokens' slots, the rows whose logits are wanted, the one-token sequences
    (decoded together, padded) and the prompt chunks (one causal call each), and per window
    what each reads (`window`, computed once per window a step)."""

    def __init__(self, seqs: Sequence[SeqStep]) -> None:
        self.n = sum(s.n_new for s in seqs)
        self.write_slots = np.fromiter((x for s in seqs for x in s.write_slots),
                                       dtype=np.int64, count=self.n)
        rows: list[int] = []
        decode_rows: list[int] = []
        self._decode_ctx: list[Sequence[int]] = []
        self.prefill_rows: list[tuple[int, int]] = []
        self._prefill_ctx: list[Sequence[int]] = []
        r = 0
        for s in seqs:
            if s.want_logits:
                rows.append(r + s.n_new - 1)
            if s.n_new == 1:
                decode_rows.append(r)
                self._decode_ctx.append(s.context_slots)
            else:
                self.prefill_rows.append((r, r + s.n_new))
                self._prefill_ctx.append(s.context_slots)
            r += s.n_new
        self.logits_rows = np.asarray(rows, dtype=np.int64)
        self.decode_rows = np.asarray(decode_rows, dtype=np.int64)
        self._windows: dict[int, WindowPlan] = {}

    def window(self, window: int) -> WindowPlan:
        """A layer of `window` reads only the slots of its last `window` positions."""
        plan = self._windows.get(window)
        if plan is None:
            plan = self._windows[window] = self._plan(window)
        return plan

    def _plan(self, window: int) -> WindowPlan:
        slots = valid = None
        if self._decode_ctx:
            kept = [c[-window:] if window else c for c in self._decode_ctx]
            width = max(len(c) for c in kept)
            slots = np.zeros((len(kept), width), dtype=np.int64)
            valid = np.zeros((len(kept), width), dtype=bool)
            for i, c in enumerate(kept):
                slots[i, : len(c)] = c
                valid[i, : len(c)] = True
            if valid.all():
                valid = None
        prefills = []
        for (r0, r1), ctx in zip(self.prefill_rows, self._prefill_ctx, strict=True):
            n = r1 - r0
            start = len(ctx) - n  # positions before the chunk
            first = max(0, start - window + 1) if window else 0  # the first position any sees
            mask = np.tril(np.ones((n, len(ctx) - first), dtype=bool), start - first)
            if window:
                mask = np.triu(mask, start - first - window + 1)
            prefills.append((np.asarray(ctx[first:], dtype=np.int64), mask))
        return WindowPlan(slots, valid, prefills)
