"""Random allocate/append/prefill/fork/truncate/free/import sequences against a model of what
each session holds and a fake backend that records which prefix every slot's K/V encodes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llama_engine.errors import InvalidParamsError, OutOfKVMemoryError
from llama_kv import PagedKVCache

NUM_BLOCKS = 12
BLOCK_SIZE = 4
# prompts are drawn as a prefix of one of a few base sequences plus a short random tail, over a
# tiny alphabet, so prefix hits, duplicates and evictions all happen often
BASES = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], [0] * 14]
tails = st.lists(st.integers(0, 3), max_size=6)
prompts = st.builds(lambda base, n, tail: base[:n] + tail,
                    st.sampled_from(BASES), st.integers(0, 14), tails)


class KVMachine(RuleBasedStateMachine):
    def __init__(self, fake_kv: type, window: int) -> None:
        super().__init__()
        self.cache = PagedKVCache(NUM_BLOCKS, block_size=BLOCK_SIZE, window=window)
        self.kv = fake_kv(self.cache)
        self.model: dict[str, list[int]] = {}  # session id -> the tokens it must hold
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"s{self.next_id}"

    def _snapshot(self) -> tuple:
        c = self.cache
        return c.stats(), {s: (c.block_ids(s), c.token_ids(s)) for s in c.session_ids()}

    def _pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model)))

    # --- rules ---------------------------------------------------------------------------------

    @rule()
    def allocate(self) -> None:
        sid = self._new_id()
        self.cache.allocate(sid)
        self.model[sid] = []

    @rule(prompt=prompts)
    def new_session_from_prompt(self, prompt: list[int]) -> None:
        sid = self._new_id()
        expect_hit = self.cache.match_prefix(prompt[:-1])[1] if prompt else 0
        self.cache.allocate(sid)
        self.model[sid] = []
        before = self._snapshot()
        try:
            plan = self.cache.prefill_plan(sid, prompt)
        except OutOfKVMemoryError:
            assert self._snapshot() == before
            return
        assert plan.prefix_hit_tokens == plan.start_pos == expect_hit
        self.kv.run(sid, plan)
        self.model[sid] = list(prompt)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        sid = self._pick(data)
        needed = self.cache.blocks_needed(sid, len(tokens))
        fits = self.cache.can_append(sid, len(tokens))
        before = self._snapshot()
        try:
            plan = self.cache.append_tokens(sid, tokens)
        except OutOfKVMemoryError:
            assert not fits and self._snapshot() == before
            return
        assert fits
        assert len(plan.copies) <= 1
        used = before[0]["kv_blocks_used"]
        assert self.cache.stats()["kv_blocks_used"] == used + needed
        self.kv.run(sid, plan)
        self.model[sid] += tokens

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tail=tails)
    def prefill_existing(self, data: st.DataObject, tail: list[int]) -> None:
        sid = self._pick(data)
        held = self.model[sid]
        context = held[: data.draw(st.integers(0, len(held)))] + tail
        before = self._snapshot()
        try:
            plan = self.cache.prefill_plan(sid, context)
        except OutOfKVMemoryError:
            assert self._snapshot() == before
            return
        assert context[: plan.start_pos] + plan.token_ids == context
        assert not context or plan.token_ids  # the last token is always computed
        self.kv.run(sid, plan)
        self.model[sid] = list(context)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def failed_forward(self, data: st.DataObject, tokens: list[int]) -> None:
        """A plan whose forward fails after its copies: roll back with invalidate=True."""
        sid = self._pick(data)
        try:
            plan = self.cache.append_tokens(sid, tokens)
        except OutOfKVMemoryError:
            return
        self.kv.copy_blocks(plan)
        self.cache.truncate(sid, plan.start_pos, invalidate=True)

    @rule(prompt=prompts)
    def failed_prefill(self, prompt: list[int]) -> None:
        """A new session's prefill fails: its registered blocks must never be reused."""
        sid = self._new_id()
        self.cache.allocate(sid)
        self.model[sid] = []
        try:
            plan = self.cache.prefill_plan(sid, prompt)
        except OutOfKVMemoryError:
            return
        self.kv.copy_blocks(plan)
        self.cache.truncate(sid, plan.start_pos, invalidate=True)
        self.model[sid] = prompt[: plan.start_pos]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        src = self._pick(data)
        dst = self._new_id()
        used = self.cache.stats()["kv_blocks_used"]
        self.cache.fork(src, dst)
        assert self.cache.stats()["kv_blocks_used"] == used
        assert self.cache.block_ids(dst) == self.cache.block_ids(src)
        self.model[dst] = list(self.model[src])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), invalidate=st.booleans())
    def truncate(self, data: st.DataObject, invalidate: bool) -> None:
        sid = self._pick(data)
        n = data.draw(st.integers(0, len(self.model[sid])))
        released, window = self.cache.released_tokens(sid), self.cache.window
        if n and released and n < released + window - 1:  # its window reaches released ones
            with pytest.raises(InvalidParamsError, match="rewind it to no fewer"):
                self.cache.truncate(sid, n, invalidate=invalidate)
            return
        self.cache.truncate(sid, n, invalidate=invalidate)
        del self.model[sid][n:]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release_behind(self, data: st.DataObject) -> None:
        """What the scheduler does before a step: blocks out of the next token's window go."""
        sid = self._pick(data)
        used = self.cache.stats()["kv_blocks_used"]
        before = self.cache.released_tokens(sid)
        after = self.cache.release_behind(sid, len(self.model[sid]))
        assert after >= before
        if not self.cache.window:
            assert after == 0
        assert self.cache.stats()["kv_blocks_used"] <= used

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = self._pick(data)
        self.cache.free(sid)
        del self.model[sid]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def save_and_restore(self, data: st.DataObject) -> None:
        src = self._pick(data)
        saved = self.cache.export_session(src)
        saved_kv = self.kv.read(src)
        dst = self._new_id()
        before = self._snapshot()
        # shared: K/V this process computed, every position of it (a session that gave blocks
        # back no longer has them all, so it comes back private, as the engine loads files)
        shared = data.draw(st.booleans()) and not saved["released_blocks"]
        try:
            blocks = self.cache.import_session(dst, saved["token_ids"], shared=shared)
        except OutOfKVMemoryError:
            assert self._snapshot() == before
            return
        assert blocks == self.cache.block_ids(dst)
        assert not set(blocks) & set(saved["block_ids"])  # fresh blocks
        self.kv.write_saved(dst, saved_kv)
        self.model[dst] = list(saved["token_ids"])
        # what the engine does on load: the positions the file's session had given back go
        self.cache.release_behind(dst, len(self.model[dst]))
        assert self.cache.released_tokens(dst) >= min(saved["released_blocks"] * BLOCK_SIZE,
                                                      len(self.model[dst]))

    @rule(prompt=prompts)
    def match_prefix_is_consistent(self, prompt: list[int]) -> None:
        blocks, n = self.cache.match_prefix(prompt)
        assert n == len(blocks) * BLOCK_SIZE <= len(prompt)
        for i, block in enumerate(blocks):  # cached or live, the content is what prompt needs
            for off in range(BLOCK_SIZE):
                pos = i * BLOCK_SIZE + off
                assert self.kv.slots.get(block * BLOCK_SIZE + off) == tuple(prompt[: pos + 1])

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def pool_is_consistent(self) -> None:
        self.cache.check()
        s = self.cache.stats()
        assert s["kv_blocks_free"] + s["kv_blocks_used"] + s["kv_blocks_cached"] == NUM_BLOCKS
        assert s["sessions"] == len(self.model)

    @invariant()
    def sessions_read_back_their_own_prefixes(self) -> None:
        for sid, tokens in self.model.items():
            assert self.cache.token_ids(sid) == tokens
            self.kv.verify(sid)

    def teardown(self) -> None:
        for sid in list(self.model):
            self.cache.free(sid)
        self.cache.check()
        s = self.cache.stats()
        assert s["kv_blocks_used"] == 0 and s["sessions"] == 0
        assert s["kv_blocks_free"] + s["kv_blocks_cached"] == NUM_BLOCKS


@pytest.mark.parametrize("window", [0, 6])
def test_kv_cache_state_machine(fake_kv: type, window: int) -> None:
    run_state_machine_as_test(
        lambda: KVMachine(fake_kv, window),
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
