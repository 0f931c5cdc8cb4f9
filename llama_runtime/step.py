"""One scheduler step as the backends receive it: each sequence's share (`SeqStep`), and the
per-row arrays a fused native step reads (`row_arrays`). No torch here: the scheduler and the
torch-free native path use it too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama_models.ops import RopeSpec

__all__ = ["RopeTables", "RowArrays", "SeqStep", "rope_tables", "row_arrays"]


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
