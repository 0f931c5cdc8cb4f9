from __future__ import annotations

import pytest

from llama_engine.errors import InvalidParamsError, KVCacheFull, OutOfKVMemoryError
from llama_kv import BlockPool, hash_block_tokens


def _counts(pool: BlockPool) -> tuple[int, int, int]:
    return pool.num_free_blocks, pool.num_cached_blocks, pool.num_used_blocks


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(8, block_size=4)
    assert (pool.num_blocks, pool.block_size) == (8, 4)
    assert _counts(pool) == (8, 0, 0)
    assert pool.num_free_blocks_with_eviction() == 8
    pool.check()


@pytest.mark.parametrize("args", [(0,), (-1,), (4, 0), (True,), (2.0,)])
def test_bad_sizes_raise(args: tuple) -> None:
    with pytest.raises(InvalidParamsError, match="positive int"):
        BlockPool(*args)


def test_allocate_and_release_unhashed_blocks_return_to_free() -> None:
    pool = BlockPool(4, block_size=2)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    assert all(pool.ref_count(b) == 1 for b in blocks)
    assert _counts(pool) == (1, 0, 3)
    pool.incref(1)
    pool.release([2, 1, 0])
    assert _counts(pool) == (3, 0, 1)
    assert pool.ref_count(1) == 1
    pool.release([1])
    assert _counts(pool) == (4, 0, 0)
    pool.check()


def test_allocate_zero_is_empty_and_negative_raises() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    with pytest.raises(InvalidParamsError):
        pool.allocate(-1)


def test_hashed_block_becomes_cached_then_is_taken_back() -> None:
    pool = BlockPool(3, block_size=2)
    [b] = pool.allocate(1)
    h = hash_block_tokens(None, [1, 2])
    assert pool.register(b, h)
    assert pool.lookup(h) == b and pool.block_hash(b) == h
    pool.release([b])
    assert pool.is_cached(b)
    assert _counts(pool) == (2, 1, 0)
    pool.check()
    pool.incref(b)  # a prefix hit takes it back, content intact
    assert not pool.is_cached(b) and pool.ref_count(b) == 1
    assert _counts(pool) == (2, 0, 1)
    pool.check()


def test_register_duplicate_hash_keeps_the_first_block() -> None:
    pool = BlockPool(2, block_size=2)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [7, 7])
    assert pool.register(a, h)
    assert not pool.register(b, h)
    assert pool.block_hash(b) is None and pool.lookup(h) == a
    pool.release([b, a])
    assert _counts(pool) == (1, 1, 0)  # the duplicate goes back to free
    pool.check()


def test_drop_hash_of_cached_block_frees_it() -> None:
    pool = BlockPool(2, block_size=1)
    [b] = pool.allocate(1)
    h = hash_block_tokens(None, [3])
    pool.register(b, h)
    pool.release([b])
    pool.drop_hash(b)
    assert pool.lookup(h) is None and _counts(pool) == (2, 0, 0)
    pool.check()


def test_eviction_takes_free_blocks_first_then_least_recently_released() -> None:
    pool = BlockPool(4, block_size=1)
    blocks = pool.allocate(3)
    hashes = [hash_block_tokens(None, [t]) for t in (10, 11, 12)]
    for b, h in zip(blocks, hashes, strict=True):
        pool.register(b, h)
    pool.release([blocks[1]])  # LRU order: 1, 0, 2
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    assert _counts(pool) == (1, 3, 0)

    assert pool.allocate(1) == [3]  # the free block first, nothing evicted
    assert pool.evictions == 0 and pool.num_cached_blocks == 3
    assert pool.allocate(1) == [blocks[1]]  # least recently released
    assert pool.lookup(hashes[1]) is None and pool.block_hash(blocks[1]) is None
    assert pool.lookup(hashes[0]) == blocks[0]
    pool.incref(blocks[0])  # touched: no longer evictable
    assert pool.allocate(1) == [blocks[2]]
    assert pool.evictions == 2
    pool.check()


def test_release_refreshes_lru_position() -> None:
    pool = BlockPool(2, block_size=1)
    a, b = pool.allocate(2)
    pool.register(a, hash_block_tokens(None, [1]))
    pool.register(b, hash_block_tokens(None, [2]))
    pool.release([a])
    pool.release([b])
    pool.incref(a)  # reused, then released again: now the most recent
    pool.release([a])
    assert pool.allocate(1) == [b]


def test_out_of_memory_is_all_or_nothing() -> None:
    pool = BlockPool(3, block_size=4)
    [held] = pool.allocate(1)
    before = _counts(pool)
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    with pytest.raises(OutOfKVMemoryError, match=r"needs 3 new blocks .* kv_memory=") as e:
        pool.allocate(3)
    assert isinstance(e.value, KVCacheFull)
    assert "close idle sessions" in str(e.value) and "pool has 3 blocks" in str(e.value)
    assert _counts(pool) == before and pool.ref_count(held) == 1
    pool.check()
    assert len(pool.allocate(2)) == 2


def test_release_below_zero_and_sharing_a_free_block_raise() -> None:
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError, match="ref_count 0"):
        pool.release([b])
    with pytest.raises(RuntimeError, match="free"):
        pool.incref(b)
    with pytest.raises(RuntimeError, match="not in use"):
        pool.register(b, b"x" * 16)


def test_check_reports_broken_state() -> None:
    pool = BlockPool(3)
    pool.allocate(1)
    pool._ref[0] = 0  # used block with ref 0, not in any idle structure
    with pytest.raises(RuntimeError, match="block 0 has ref_count 0"):
        pool.check()
    pool = BlockPool(3)
    pool._ref[2] = -1
    with pytest.raises(RuntimeError, match="negative"):
        pool.check()
    pool = BlockPool(3)
    pool._free.append(1)
    with pytest.raises(RuntimeError, match="twice"):
        pool.check()
