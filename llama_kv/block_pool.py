"""The block pool: `num_blocks` fixed KV blocks, their reference counts, and the prefix cache.

A block is a slot range ``[block_id * block_size, (block_id + 1) * block_size)`` of the backend's
K/V tensors (``[layers, num_blocks, block_size, kv_heads, head_dim]``). The pool only counts.

Every block is in exactly one of three states:

- **used**: ``ref_count > 0``; held by that many block tables;
- **cached**: ``ref_count == 0`` and it still holds a full block registered under its hash, so a
  later prompt with the same prefix can take it back; evictable, kept in LRU order;
- **free**: ``ref_count == 0`` and no content worth keeping.

Invariants (checked by `BlockPool.check`):

- ref counts are never negative;
- free + cached + used == num_blocks;
- a block is in the free list or the cached LRU iff its ref_count == 0, and never in both;
- a block in the free list has no hash; a cached block has one;
- the hash map and the blocks agree: ``block_hash(lookup(h)) == h`` for every registered ``h``,
  and every block with a hash is registered under it (one block per hash).

Allocation takes free blocks first, then evicts the least recently released cached block (its
hash is dropped). It is all-or-nothing: a request it cannot fully serve raises
`OutOfKVMemoryError` and changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from llama_engine.errors import InvalidParamsError, OutOfKVMemoryError
from llama_kv.hashing import BlockHash

__all__ = ["BlockPool", "out_of_kv_memory"]


class BlockPool:
    """`num_blocks` KV blocks of `block_size` tokens each, with ref counts and a prefix cache."""

    __slots__ = ("_block_size", "_cached", "_free", "_hash", "_hash_to_block", "_num_blocks",
                 "_ref", "evictions")

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParamsError(f"{name} must be a positive int, got {value!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._ref: list[int] = [0] * num_blocks  # ref_count per block id
        self._hash: list[BlockHash | None] = [None] * num_blocks  # registered full-block hash
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash; taken from the left
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        self._hash_to_block: dict[BlockHash, int] = {}
        self.evictions = 0  # cached blocks reclaimed by allocation so far

    # --- sizes -----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Total number of blocks."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref 0 and no reusable content."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with ref 0 that keep a hashed full block for prefix reuse (evictable)."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count > 0."""
        return self._num_blocks - len(self._free) - len(self._cached)

    def num_free_blocks_with_eviction(self) -> int:
        """How many blocks `allocate` can hand out right now (free + cached)."""
        return len(self._free) + len(self._cached)

    def can_allocate(self, n_blocks: int) -> bool:
        """Whether `allocate(n_blocks)` would succeed now (it never raises)."""
        return 0 <= n_blocks <= self.num_free_blocks_with_eviction()

    # --- per block ---------------------------------------------------------------------------

    def ref_count(self, block_id: int) -> int:
        """The number of block tables holding `block_id`."""
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash `block_id` is registered under, or None."""
        return self._hash[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether `block_id` is unreferenced but kept for prefix reuse."""
        return block_id in self._cached

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block registered under `block_hash` (used or cached), or None."""
        return self._hash_to_block.get(block_hash)

    # --- mutation ------------------------------------------------------------------------------

    def allocate(self, n_blocks: int) -> list[int]:
        """Take `n_blocks` blocks (ref_count 1 each, no hash): free ones first, then evict LRU.

        All or nothing: raises `OutOfKVMemoryError` without changing anything if short.
        """
        if n_blocks < 0:
            raise InvalidParamsError(f"n_blocks must be >= 0, got {n_blocks}")
        if n_blocks > self.num_free_blocks_with_eviction():
            raise out_of_kv_memory(self, n_blocks, f"allocating {n_blocks} blocks")
        out: list[int] = []
        for _ in range(n_blocks):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                h = self._hash[block]
                assert h is not None
                del self._hash_to_block[h]
                self._hash[block] = None
                self.evictions += 1
            self._ref[block] = 1
            out.append(block)
        return out

    def incref(self, block_id: int) -> None:
        """Add a holder to `block_id` (a used block, or a cached one taken back)."""
        if self._ref[block_id] == 0:
            if block_id not in self._cached:
                raise RuntimeError(f"block {block_id} is free (no content); cannot share it")
            del self._cached[block_id]
        self._ref[block_id] += 1

    def release(self, block_ids: Iterable[int], *, uncache: bool = False,
                evict_first: bool = False) -> None:
        """Drop one holder from each block, in order.

        A block whose count reaches 0 becomes cached (most recently used) if it has a hash, else
        free. Pass the tail first so tails are evicted before the prefixes they extend.
        `uncache=True` also drops the hashes of these blocks (their contents are not trusted).
        `evict_first=True` caches them as the least recently used instead, each before the
        previous one (pass the head first: the last one given is evicted first).
        """
        for block in block_ids:
            if self._ref[block] <= 0:
                raise RuntimeError(f"block {block} released with ref_count {self._ref[block]}")
            if uncache:
                self.drop_hash(block)
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None
                    if evict_first:
                        self._cached.move_to_end(block, last=False)

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Record that used block `block_id` holds the full block `block_hash`.

        Returns False (and records nothing) if another block already holds that hash.
        """
        if self._ref[block_id] <= 0:
            raise RuntimeError(f"block {block_id} is not in use; cannot register its hash")
        if self._hash[block_id] is not None:
            raise RuntimeError(f"block {block_id} already has a hash")
        if block_hash in self._hash_to_block:
            return False
        self._hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        return True

    def drop_hash(self, block_id: int) -> None:
        """Forget `block_id`'s hash (its contents will change); a cached one becomes free."""
        h = self._hash[block_id]
        if h is None:
            return
        del self._hash_to_block[h]
        self._hash[block_id] = None
        if block_id in self._cached:
            del self._cached[block_id]
            self._free.append(block_id)

    # --- checks ------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise RuntimeError naming the first broken invariant (see the module docstring)."""
        n = self._num_blocks
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block appears twice in the free list")
        cached = set(self._cached)
        if free & cached:
            raise RuntimeError(f"blocks {sorted(free & cached)} are both free and cached")
        for block in range(n):
            ref = self._ref[block]
            if ref < 0:
                raise RuntimeError(f"block {block} has negative ref_count {ref}")
            idle = block in free or block in cached
            if idle != (ref == 0):
                raise RuntimeError(
                    f"block {block} has ref_count {ref} but is "
                    f"{'' if idle else 'not '}in the free/cached structures")
            h = self._hash[block]
            if block in free and h is not None:
                raise RuntimeError(f"free block {block} still has a hash")
            if block in cached and h is None:
                raise RuntimeError(f"cached block {block} has no hash")
            if h is not None and self._hash_to_block.get(h) != block:
                raise RuntimeError(f"block {block}'s hash is not registered to it")
        used = sum(1 for r in self._ref if r > 0)
        if len(free) + len(cached) + used != n:
            raise RuntimeError(
                f"free {len(free)} + cached {len(cached)} + used {used} != total {n}")
        for h, block in self._hash_to_block.items():
            if not 0 <= block < n or self._hash[block] != h:
                raise RuntimeError(f"hash map entry points at block {block}, which disagrees")


def out_of_kv_memory(
    pool: BlockPool, needed: int, what: str, *, available: int | None = None
) -> OutOfKVMemoryError:
    """The error for `what` needing `needed` blocks when only `available` can be had."""
    if available is None:
        available = pool.num_free_blocks_with_eviction()
    return OutOfKVMemoryError(
        f"KV cache is full: {what} needs {needed} new blocks of {pool.block_size} tokens but "
        f"only {available} can be had (the pool has {pool.num_blocks} "
        f"blocks: {pool.num_used_blocks} in use by live sessions, {pool.num_cached_blocks} "
        "cached); close idle sessions, raise the KV memory budget with kv_memory=..., "
        "or shorten the prompt")
