"""A fake backend for the KV bookkeeping tests: each slot records the token prefix it encodes."""

from __future__ import annotations

import pytest

from llama_kv import PagedKVCache, SlotPlan
from llama_kv.block_table import RELEASED


class FakeKV:
    """Stands in for the K/V tensors. The K/V at position p depends on tokens[:p+1], so each
    slot stores that prefix; a session reads back right iff every slot it holds matches."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.slots: dict[int, tuple[int, ...]] = {}

    def copy_blocks(self, plan: SlotPlan) -> None:
        bs = self.cache.block_size
        for src, dst in plan.copies:
            for off in range(bs):
                value = self.slots.get(src * bs + off)
                if value is None:
                    self.slots.pop(dst * bs + off, None)
                else:
                    self.slots[dst * bs + off] = value

    def run(self, session_id: str, plan: SlotPlan) -> None:
        """Carry out `plan`: copies first, then write each new token's K/V."""
        self.copy_blocks(plan)
        tokens = self.cache.token_ids(session_id)
        assert tokens[plan.start_pos : plan.num_tokens] == plan.token_ids
        for pos, slot in zip(plan.positions, plan.slot_mapping, strict=True):
            self.slots[slot] = tuple(tokens[: pos + 1])

    def write_saved(self, session_id: str, saved: list[tuple[int, ...] | None]) -> None:
        """Restore an imported session's K/V, position by position (a released position's is
        gone: None)."""
        for slot, value in zip(self.cache.slot_mapping(session_id), saved, strict=True):
            if value is None:
                self.slots.pop(slot, None)
            else:
                self.slots[slot] = value

    def read(self, session_id: str) -> list[tuple[int, ...] | None]:
        return [None if s == RELEASED else self.slots.get(s)
                for s in self.cache.slot_mapping(session_id)]

    def verify(self, session_id: str) -> None:
        """Every held position encodes its prefix, and the next token's window is held."""
        tokens = self.cache.token_ids(session_id)
        released = self.cache.released_tokens(session_id)
        window = self.cache.window
        assert released <= max(0, len(tokens) + 1 - window) if window else released == 0
        for pos, value in enumerate(self.read(session_id)):
            if pos < released:
                continue
            assert value == tuple(tokens[: pos + 1]), (
                f"session {session_id!r} position {pos} holds K/V of {value}, "
                f"not of {tokens[: pos + 1]}")


@pytest.fixture
def fake_kv() -> type[FakeKV]:
    return FakeKV
