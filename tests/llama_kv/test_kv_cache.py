from __future__ import annotations

import subprocess
import sys

import pytest

from llama_engine.errors import InvalidParamsError, OutOfKVMemoryError, SessionError
from llama_kv import PagedKVCache, hash_block_tokens, hash_token_blocks


def _blocks(cache: PagedKVCache) -> tuple[int, int, int]:
    s = cache.stats()
    return s["kv_blocks_free"], s["kv_blocks_cached"], s["kv_blocks_used"]


# --- basics --------------------------------------------------------------------------------------


def test_append_reserves_slots_block_by_block() -> None:
    cache = PagedKVCache(8, block_size=4)
    cache.allocate("a")
    p = cache.append_tokens("a", [1, 2, 3])
    assert (p.start_pos, p.token_ids, p.slot_mapping, p.copies) == (0, [1, 2, 3], [0, 1, 2], [])
    assert p.num_tokens == 3 and list(p.positions) == [0, 1, 2]
    p = cache.append_tokens("a", [4, 5])
    assert (p.start_pos, p.slot_mapping) == (3, [3, 4])
    assert cache.block_ids("a") == [0, 1]
    assert cache.num_tokens("a") == 5 and cache.token_ids("a") == [1, 2, 3, 4, 5]
    assert cache.slot_mapping("a") == [0, 1, 2, 3, 4]
    assert cache.slot_mapping("a", 3, 5) == [3, 4]
    # the full first block is registered under its chained hash
    assert cache.pool.block_hash(0) == hash_block_tokens(None, [1, 2, 3, 4])
    assert cache.pool.block_hash(1) is None
    cache.check()


def test_append_nothing_changes_nothing() -> None:
    cache = PagedKVCache(2, block_size=4)
    cache.allocate("a")
    p = cache.append_tokens("a", [])
    assert (p.start_pos, p.token_ids, p.slot_mapping, p.copies) == (0, [], [], [])
    assert cache.block_ids("a") == []


def test_slots_use_the_block_ids_given() -> None:
    cache = PagedKVCache(8, block_size=4)
    cache.allocate("x")
    cache.append_tokens("x", [9] * 4)  # takes block 0
    cache.allocate("a")
    p = cache.append_tokens("a", [1, 2, 3, 4, 5, 6])
    assert cache.block_ids("a") == [1, 2]
    assert p.slot_mapping == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("bad", [[-1], [1.5], [True], ["3"], [2**63]])
def test_bad_token_ids_raise(bad: list) -> None:
    cache = PagedKVCache(2)
    cache.allocate("a")
    with pytest.raises(InvalidParamsError, match="non-negative ints"):
        cache.append_tokens("a", bad)
    assert cache.num_tokens("a") == 0


def test_session_errors() -> None:
    cache = PagedKVCache(2)
    with pytest.raises(SessionError, match="unknown or closed"):
        cache.append_tokens("nope", [1])
    cache.allocate("a")
    with pytest.raises(SessionError, match="already exists"):
        cache.allocate("a")
    with pytest.raises(SessionError, match="already exists"):
        cache.fork("a", "a")
    with pytest.raises(InvalidParamsError, match="non-empty str"):
        cache.allocate("")
    cache.free("a")
    assert "a" not in cache
    for call in (lambda: cache.free("a"), lambda: cache.num_tokens("a"),
                 lambda: cache.block_ids("a"), lambda: cache.truncate("a", 0),
                 lambda: cache.export_session("a")):
        with pytest.raises(SessionError, match="unknown or closed"):
            call()


def test_slot_mapping_range_is_checked() -> None:
    cache = PagedKVCache(2, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2])
    with pytest.raises(InvalidParamsError, match="outside"):
        cache.slot_mapping("a", 0, 3)


# --- truncate / free -----------------------------------------------------------------------------


def test_truncate_releases_blocks_past_n() -> None:
    cache = PagedKVCache(4, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", list(range(10)))
    assert cache.block_ids("a") == [0, 1, 2]
    cache.truncate("a", 5)
    assert cache.block_ids("a") == [0, 1] and cache.token_ids("a") == [0, 1, 2, 3, 4]
    assert _blocks(cache) == (2, 0, 2)
    p = cache.append_tokens("a", [50, 51, 52, 53])
    # block 1 offsets 1..3, then block 3: the free list is FIFO, released block 2 went last
    assert p.start_pos == 5 and p.slot_mapping == [5, 6, 7, 12]
    cache.truncate("a", 0)
    assert cache.block_ids("a") == [] and _blocks(cache)[2] == 0
    cache.check()


@pytest.mark.parametrize("n", [-1, 4, 1.0])
def test_truncate_out_of_range_raises(n: object) -> None:
    cache = PagedKVCache(4, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2, 3])
    with pytest.raises(InvalidParamsError, match="n_tokens"):
        cache.truncate("a", n)  # type: ignore[arg-type]


def test_truncate_into_full_block_then_write_drops_its_hash() -> None:
    cache = PagedKVCache(8, block_size=4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    cache.allocate("a")
    cache.append_tokens("a", tokens)
    assert cache.match_prefix(tokens)[1] == 8
    cache.truncate("a", 6)
    assert cache.match_prefix(tokens)[1] == 8  # the content is still intact
    cache.append_tokens("a", [99])  # overwrites offset 2 of block 1 (only we hold it)
    assert cache.match_prefix(tokens) == ([0], 4)
    cache.check()


def test_free_decrements_each_block_once_and_caches_full_blocks() -> None:
    cache = PagedKVCache(6, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", list(range(10)))  # blocks 0, 1 full; 2 partial
    cache.fork("a", "b")
    assert [cache.pool.ref_count(b) for b in range(3)] == [2, 2, 2]
    cache.free("a")
    assert [cache.pool.ref_count(b) for b in range(3)] == [1, 1, 1]
    cache.free("b")
    assert _blocks(cache) == (4, 2, 0)  # the two full hashed blocks are cached
    assert cache.stats()["sessions"] == 0
    cache.check()


# --- fork and copy-on-write ----------------------------------------------------------------------


def test_fork_then_append_into_shared_partial_block_copies(fake_kv) -> None:
    cache = PagedKVCache(8, block_size=4)
    kv = fake_kv(cache)
    cache.allocate("a")
    kv.run("a", cache.append_tokens("a", [1, 2, 3, 4, 5, 6]))
    assert cache.block_ids("a") == [0, 1]
    before = kv.read("a")
    cache.fork("a", "b")
    assert cache.block_ids("b") == [0, 1] and cache.token_ids("b") == cache.token_ids("a")
    assert cache.pool.ref_count(0) == cache.pool.ref_count(1) == 2

    p = cache.append_tokens("b", [70])
    assert p.copies == [(1, 2)]  # src block 1 -> new block 2, before writing
    assert p.slot_mapping == [2 * 4 + 2]
    kv.run("b", p)
    assert cache.block_ids("b") == [0, 2] and cache.block_ids("a") == [0, 1]
    assert cache.pool.ref_count(1) == 1 and cache.pool.ref_count(0) == 2
    assert kv.read("a") == before  # the source's block is untouched
    kv.verify("a")
    kv.verify("b")

    p = cache.append_tokens("a", [80])  # block 1 is no longer shared: written in place
    assert p.copies == [] and p.slot_mapping == [1 * 4 + 2]
    kv.run("a", p)
    kv.verify("a")
    kv.verify("b")
    cache.check()


def test_fork_source_writing_first_also_copies(fake_kv) -> None:
    cache = PagedKVCache(8, block_size=4)
    kv = fake_kv(cache)
    cache.allocate("a")
    kv.run("a", cache.append_tokens("a", [1, 2, 3]))
    cache.fork("a", "b")
    p = cache.append_tokens("a", [4])
    assert p.copies == [(0, 1)]
    kv.run("a", p)
    assert cache.block_ids("b") == [0]
    kv.verify("a")
    kv.verify("b")


def test_fork_at_block_boundary_needs_no_copy() -> None:
    cache = PagedKVCache(8, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2, 3, 4])
    cache.fork("a", "b")
    assert cache.blocks_needed("b", 1) == 1
    p = cache.append_tokens("b", [5])
    assert p.copies == [] and cache.block_ids("b") == [0, 1]


def test_fork_unknown_source_raises() -> None:
    cache = PagedKVCache(2)
    with pytest.raises(SessionError):
        cache.fork("a", "b")
    assert "b" not in cache


# --- prefix sharing ------------------------------------------------------------------------------


PREFIX = [(7 * i + 3) % 1000 for i in range(200)]


def test_prefix_of_200_tokens_shares_12_full_blocks(fake_kv) -> None:
    cache = PagedKVCache(40, block_size=16)
    kv = fake_kv(cache)
    cache.allocate("a")
    p = cache.prefill_plan("a", [*PREFIX, 1, 2, 3])
    assert (p.start_pos, p.prefix_hit_tokens, len(p.token_ids)) == (0, 0, 203)
    kv.run("a", p)

    cache.allocate("b")
    p = cache.prefill_plan("b", [*PREFIX, 9, 9])
    assert (p.start_pos, p.prefix_hit_tokens) == (192, 192)
    assert p.token_ids == [*PREFIX[192:], 9, 9]
    assert cache.block_ids("b")[:12] == cache.block_ids("a")[:12]
    assert cache.block_ids("b")[12] != cache.block_ids("a")[12]
    assert all(cache.pool.ref_count(b) == 2 for b in cache.block_ids("a")[:12])
    kv.run("b", p)
    kv.verify("b")  # the shared blocks hold what b needs

    s = cache.stats()
    assert s["prefix_cache_queries"] == 2 and s["prefix_cache_hits"] == 1
    assert s["prefix_cache_hit_tokens"] == 192
    assert s["prefix_cache_query_tokens"] == 203 + 202
    assert cache.match_prefix(PREFIX) == (cache.block_ids("a")[:12], 192)
    cache.check()


def test_prefix_survives_its_session_as_cached_blocks_until_evicted(fake_kv) -> None:
    cache = PagedKVCache(14, block_size=16)
    kv = fake_kv(cache)
    cache.allocate("a")
    kv.run("a", cache.prefill_plan("a", PREFIX))
    a_blocks = cache.block_ids("a")
    cache.free("a")
    assert _blocks(cache) == (2, 12, 0)  # 12 full blocks cached, the partial one free

    cache.allocate("b")
    p = cache.prefill_plan("b", PREFIX)
    assert (p.start_pos, p.prefix_hit_tokens) == (192, 192)
    assert cache.block_ids("b")[:12] == a_blocks[:12]
    kv.run("b", p)
    kv.verify("b")
    cache.free("b")

    # another session takes the whole pool: every cached block is evicted
    cache.allocate("big")
    kv.run("big", cache.append_tokens("big", [5] * (14 * 16)))
    assert cache.stats()["kv_evictions"] == 12
    cache.free("big")
    cache.allocate("c")
    p = cache.prefill_plan("c", PREFIX)
    assert (p.start_pos, p.prefix_hit_tokens) == (0, 0)
    assert cache.match_prefix(PREFIX)[1] == 192  # c's own blocks are now registered
    cache.check()


def test_whole_prompt_cached_still_leaves_last_token_to_compute() -> None:
    cache = PagedKVCache(16, block_size=16)
    prompt = PREFIX[:192]
    cache.allocate("a")
    cache.prefill_plan("a", prompt)
    cache.allocate("b")
    p = cache.prefill_plan("b", prompt)
    assert (p.start_pos, p.prefix_hit_tokens, p.token_ids) == (176, 176, prompt[176:])


def test_prefill_plan_keeps_what_the_session_holds() -> None:
    cache = PagedKVCache(16, block_size=4)
    cache.allocate("a")
    cache.prefill_plan("a", list(range(20)))
    blocks = cache.block_ids("a")
    p = cache.prefill_plan("a", [*range(10), 100, 101])  # rewinds to the common prefix
    assert (p.start_pos, p.token_ids, p.prefix_hit_tokens) == (10, [100, 101], 0)
    assert cache.block_ids("a")[:3] == blocks[:3] and len(cache.block_ids("a")) == 3
    p = cache.prefill_plan("a", [*range(10), 100, 101, 102])  # an append
    assert (p.start_pos, p.token_ids) == (12, [102])
    p = cache.prefill_plan("a", cache.token_ids("a"))  # nothing new: recompute the last token
    assert (p.start_pos, p.token_ids) == (12, [102])
    p = cache.prefill_plan("a", [])
    assert (p.start_pos, p.token_ids) == (0, []) and cache.block_ids("a") == []
    cache.check()


def test_prefill_plan_extends_a_session_from_the_prefix_cache(fake_kv) -> None:
    cache = PagedKVCache(16, block_size=4)
    kv = fake_kv(cache)
    cache.allocate("a")
    kv.run("a", cache.prefill_plan("a", list(range(16))))
    cache.allocate("b")
    kv.run("b", cache.prefill_plan("b", list(range(4))))  # holds 4, block boundary
    p = cache.prefill_plan("b", list(range(14)))
    assert (p.start_pos, p.prefix_hit_tokens) == (12, 8)
    kv.run("b", p)
    kv.verify("b")
    cache.check()


def test_hash_namespace_separates_caches() -> None:
    a = PagedKVCache(4, block_size=2, hash_namespace="model-a")
    b = PagedKVCache(4, block_size=2, hash_namespace="model-b")
    for cache in (a, b):
        cache.allocate("s")
        cache.append_tokens("s", [1, 2])
    assert a.export_session("s")["block_hashes"] != b.export_session("s")["block_hashes"]


# --- out of memory -------------------------------------------------------------------------------


def test_out_of_memory_in_append_leaks_nothing() -> None:
    cache = PagedKVCache(4, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2])
    cache.allocate("b")
    before = (cache.stats(), cache.block_ids("a"), cache.block_ids("b"))
    assert cache.blocks_needed("b", 16) == 4 and not cache.can_append("b", 16)
    assert cache.can_append("b", 12)
    with pytest.raises(OutOfKVMemoryError, match=r"needs 4 new blocks of 4 tokens but only 3"):
        cache.append_tokens("b", list(range(16)))
    with pytest.raises(OutOfKVMemoryError, match="kv_memory="):
        cache.append_tokens("b", list(range(16)))
    assert (cache.stats(), cache.block_ids("a"), cache.block_ids("b")) == before
    assert cache.num_tokens("b") == 0
    cache.check()
    cache.append_tokens("b", list(range(12)))  # what fits still fits
    cache.check()


def test_out_of_memory_counts_cached_blocks_as_evictable_but_not_hits() -> None:
    cache = PagedKVCache(4, block_size=4)
    cache.allocate("a")
    cache.prefill_plan("a", list(range(12)))
    cache.free("a")
    assert _blocks(cache) == (1, 3, 0)
    assert cache.can_allocate(4) and cache.num_free_blocks_with_eviction() == 4
    cache.allocate("b")
    before = cache.stats()
    # 3 cached blocks are hits, so only 1 block is left for the 4 new ones needed
    with pytest.raises(OutOfKVMemoryError, match="session 'b'"):
        cache.prefill_plan("b", list(range(8 + 5 * 4)))
    assert cache.stats() == before and cache.block_ids("b") == []
    cache.check()
    p = cache.prefill_plan("b", list(range(16)))  # 3 hits + 1 new block
    assert p.prefix_hit_tokens == 12
    cache.check()


def test_out_of_memory_in_copy_on_write_leaks_nothing() -> None:
    cache = PagedKVCache(1, block_size=4)
    cache.allocate("a")
    cache.append_tokens("a", [1])
    cache.fork("a", "b")
    assert cache.blocks_needed("b", 1) == 1
    with pytest.raises(OutOfKVMemoryError):
        cache.append_tokens("b", [2])
    assert cache.pool.ref_count(0) == 2 and cache.token_ids("b") == [1]
    cache.check()


# --- failed forwards -----------------------------------------------------------------------------


def test_invalidate_drops_hashes_of_unwritten_blocks(fake_kv) -> None:
    cache = PagedKVCache(8, block_size=4)
    kv = fake_kv(cache)
    cache.allocate("a")
    kv.run("a", cache.append_tokens("a", [1, 2]))
    p = cache.append_tokens("a", [3, 4, 5, 6, 7, 8, 9])  # the forward "fails": nothing written
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])[1] == 8
    cache.truncate("a", p.start_pos, invalidate=True)
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]) == ([], 0)
    kv.verify("a")
    cache.free("a")
    assert _blocks(cache) == (8, 0, 0)
    cache.check()


# --- save / restore ------------------------------------------------------------------------------


def test_export_then_import_into_a_fresh_cache(fake_kv) -> None:
    cache = PagedKVCache(8, block_size=4)
    kv = fake_kv(cache)
    tokens = list(range(100, 110))
    cache.allocate("a")
    kv.run("a", cache.append_tokens("a", tokens))
    saved = cache.export_session("a")
    assert saved["num_tokens"] == 10 and saved["token_ids"] == tokens
    assert saved["block_ids"] == cache.block_ids("a") and saved["block_size"] == 4
    assert saved["block_hashes"] == [h.hex() for h in hash_token_blocks(tokens, 4)]
    saved_kv = kv.read("a")

    other = PagedKVCache(6, block_size=4)
    other_kv = fake_kv(other)
    other.allocate("x")
    other.append_tokens("x", [0])
    blocks = other.import_session("restored", saved["token_ids"], shared=True)
    assert blocks == [1, 2, 3] == other.block_ids("restored")
    assert other.num_tokens("restored") == 10
    other_kv.write_saved("restored", saved_kv)
    other_kv.verify("restored")
    assert other.match_prefix(tokens) == (blocks[:2], 8)  # stable hashes, registered on import
    other.check()

    with pytest.raises(SessionError, match="already exists"):
        other.import_session("restored", tokens)
    with pytest.raises(OutOfKVMemoryError, match="importing session 'big'"):
        other.import_session("big", list(range(40)))
    assert "big" not in other
    other.check()


def test_imported_session_is_private_until_truncated_to_nothing(fake_kv) -> None:
    """K/V from a file serves only its session: nothing it holds or computes after it enters the
    prefix cache, so another session's prompt never reuses it."""
    cache = PagedKVCache(16, block_size=4)
    kv = fake_kv(cache)
    tokens = list(range(100, 110))
    blocks = cache.import_session("loaded", tokens)
    assert not cache.is_shared("loaded")
    assert cache.match_prefix(tokens) == ([], 0)
    kv.run("loaded", cache.append_tokens("loaded", list(range(110, 120))))
    assert cache.num_tokens("loaded") == 20
    assert cache.match_prefix([*tokens, *range(110, 120)]) == ([], 0)
    cache.allocate("other")
    plan = cache.prefill_plan("other", [*tokens, 1, 2, 3])
    assert plan.prefix_hit_tokens == 0 and plan.start_pos == 0
    cache.check()
    # a prompt that keeps part of the loaded context stays private; one that replaces it all
    # (or a truncate to nothing) makes the session an ordinary one again
    kv.run("loaded", cache.prefill_plan("loaded", [*tokens[:6], 7, 7]))
    assert not cache.is_shared("loaded")
    kv.run("loaded", cache.prefill_plan("loaded", [5, 5, 5, 5, 5, 5]))
    assert cache.is_shared("loaded")
    assert cache.match_prefix([5, 5, 5, 5, 5]) == ([cache.block_ids("loaded")[0]], 4)
    cache.free("loaded")
    cache.free("other")
    cache.check()
    assert cache.stats()["kv_blocks_used"] == 0
    del blocks


# --- stats, checks, imports ----------------------------------------------------------------------


def test_stats_keys_and_counts() -> None:
    cache = PagedKVCache(5, block_size=2)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2, 3])
    s = cache.stats()
    assert s["kv_blocks_total"] == 5 and s["kv_blocks_used"] == 2 and s["kv_blocks_free"] == 3
    assert s["kv_blocks_cached"] == 0 and s["sessions"] == 1 and s["kv_tokens"] == 3
    assert s["kv_blocks_free"] + s["kv_blocks_cached"] + s["kv_blocks_used"] == 5
    for key in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_query_tokens",
                "prefix_cache_hit_tokens", "kv_evictions", "kv_block_size"):
        assert key in s


def test_check_catches_a_ref_count_that_disagrees_with_the_tables() -> None:
    cache = PagedKVCache(4, block_size=2)
    cache.allocate("a")
    cache.append_tokens("a", [1, 2, 3])
    cache.pool.incref(0)
    with pytest.raises(RuntimeError, match="block 0 has ref_count 2 but 1 tables hold it"):
        cache.check()


def test_importing_llama_kv_imports_no_torch_mlx_or_numpy() -> None:
    code = (
        "import sys, llama_kv\n"
        "print(','.join(m for m in ('torch', 'mlx', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_windowed_session_gives_blocks_back_and_keeps_its_prefix_matchable(fake_kv) -> None:
    """Window 24, blocks of 8: generating 200 tokens one at a time, the session never holds
    more than 4 blocks; the blocks it gave back stay cached and are evicted deepest first, so
    once the session is closed and another takes six blocks, the prompt's head still matches."""
    cache = PagedKVCache(30, block_size=8, window=24)
    kv = fake_kv(cache)
    tokens = [(7 * i) % 50 for i in range(200)]
    cache.allocate("s")
    kv.run("s", cache.prefill_plan("s", tokens[:1]))
    for i in range(1, 200):
        cache.release_behind("s", i)
        kv.run("s", cache.append_tokens("s", [tokens[i]]))
        assert cache.stats()["kv_blocks_used"] <= 4
        kv.verify("s")
        cache.check()
    assert cache.released_tokens("s") == 176  # (199 + 1 - 24) // 8 blocks
    cache.free("s")
    cache.allocate("t")
    # 6 blocks: the 5 free ones and one cached, the deepest given back (block 21)
    cache.append_tokens("t", [1] * 48)
    blocks, n = cache.match_prefix(tokens)
    assert n == 21 * 8 and cache.stats()["kv_evictions"] == 1
    for i, block in enumerate(blocks):  # what they hold is the prompt's own K/V
        assert kv.slots[block * 8] == tuple(tokens[: i * 8 + 1])
