"""`PagedKVCache`: per-session block tables over one `BlockPool`, with prefix sharing and CoW.

The cache hands out *slots*; the backend keeps the K/V tensors and writes where it is told.
Each mutating call returns a `SlotPlan` for the backend to carry out, in the order made:

1. copy every ``(src_block, dst_block)`` in ``plan.copies`` (whole blocks, every layer);
2. compute K/V for ``plan.token_ids`` at positions ``plan.start_pos ...`` and write token i's
   to flat slot ``plan.slot_mapping[i]`` (``block_id * block_size + offset``);
3. attend over the session's ``block_ids`` for ``plan.num_tokens`` positions.

Full blocks are registered for prefix sharing as soon as a plan is made, so a later plan may
reuse them: carry out plans in the order they were made (a batched forward that writes every new
K/V of a layer before attending is fine). If a forward fails after its plan, call
``truncate(session_id, plan.start_pos, invalidate=True)`` so unwritten blocks are never reused.

With `window` (every layer of the model attends to at most its last `window` positions), a
session's blocks that fall wholly before the next token's window are given back as it grows
(`release_behind`, called by the scheduler before each step): a long generation holds
O(window) blocks, not O(context). Released full blocks keep their hashes, so they stay in the
prefix cache (cached, evicted first and deepest first) and a later prompt with the same prefix
still takes them back; the released session itself can be rewound only past its window (else it
recomputes). Recomputing a context (a preempted request, a rewind past the window) and importing
a saved session still reserve blocks for the whole context before giving the old ones back.

Invariants (checked by `PagedKVCache.check`, on top of `BlockPool.check`):
  - a block's ref_count equals the number of tables holding it; every held block is used;
  - a table holding n tokens has exactly ceil(n / block_size) blocks and n // block_size hashes;
  - a table's block hashes are the chain of its tokens' full blocks;
  - freeing a table releases each of its blocks exactly once;
  - a partially filled block is written by a session only if no other table holds it (else the
    write copies it first) and it is not registered in the prefix cache (else its hash is
    dropped first).

Not thread-safe: the scheduler serialises calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_engine.errors import InvalidParamsError, SessionError
from llama_kv.block_pool import BlockPool, out_of_kv_memory
from llama_kv.block_table import RELEASED, BlockTable
from llama_kv.hashing import BlockHash, hash_block_tokens, root_hash

__all__ = ["PagedKVCache", "SlotPlan"]

_MAX_TOKEN = 2**63


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """What the backend must do for one append or prefill of one session."""

    start_pos: int  # positions < start_pos already have K/V in the cache (kept or shared)
    token_ids: list[int]  # tokens whose K/V the backend computes, at start_pos, start_pos+1, ...
    slot_mapping: list[int]  # flat slot per token in token_ids: block_id * block_size + offset
    copies: list[tuple[int, int]]  # (src_block, dst_block) whole-block copies to do first
    prefix_hit_tokens: int = 0  # tokens of this call served by the shared prefix cache

    @property
    def num_tokens(self) -> int:
        """The session's length once this plan is carried out."""
        return self.start_pos + len(self.token_ids)

    @property
    def positions(self) -> range:
        """Positions of `token_ids`."""
        return range(self.start_pos, self.num_tokens)


class PagedKVCache:
    """Block tables keyed by session id over a pool of `num_blocks` blocks of `block_size`.

    `hash_namespace` seeds the prefix hashes (use the model's id so caches of two models never
    match each other's blocks in saved sessions). `window`: the positions a new token attends
    back over on every layer (the model's sliding window when every layer has one), or 0: all.
    """

    def __init__(self, num_blocks: int, *, block_size: int = 16, hash_namespace: str = "",
                 window: int = 0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise InvalidParamsError(f"window must be a non-negative int, got {window!r}")
        self.pool = BlockPool(num_blocks, block_size)
        self.window = window
        self._root = root_hash(hash_namespace)
        self._tables: dict[str, BlockTable] = {}
        self._queries = 0
        self._hits = 0
        self._query_tokens = 0
        self._hit_tokens = 0

    # --- sizes and queries ---------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self.pool.num_blocks

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._tables

    def session_ids(self) -> list[str]:
        """Ids of the live sessions."""
        return list(self._tables)

    def num_tokens(self, session_id: str) -> int:
        """Tokens the session holds."""
        return self._table(session_id).num_tokens

    def token_ids(self, session_id: str) -> list[int]:
        """The session's tokens (a copy)."""
        return list(self._table(session_id).token_ids)

    def context(self, session_id: str) -> list[int]:
        """The session's context (a copy): the tokens whose K/V are written or being written by
        the step underway; what callers see as Session.tokens. [] for an unknown session."""
        table = self._tables.get(session_id)
        return [] if table is None else table.token_ids[: table.context]

    def context_length(self, session_id: str) -> int:
        return self._table(session_id).context

    def set_context(self, session_id: str, n_tokens: int) -> None:
        """Mark the first `n_tokens` held tokens as the session's context (the scheduler, as a
        step is planned, or rolled back when its forward fails)."""
        table = self._table(session_id)
        if not 0 <= n_tokens <= table.num_tokens:
            raise InvalidParamsError(
                f"a context of {n_tokens} tokens is not within session {session_id!r}'s "
                f"{table.num_tokens}")
        table.context = n_tokens

    def block_ids(self, session_id: str) -> list[int]:
        """The session's block ids in position order (a copy; RELEASED for released blocks)."""
        return list(self._table(session_id).block_ids)

    def released_tokens(self, session_id: str) -> int:
        """Leading positions whose K/V was given back (release_behind)."""
        table = self._table(session_id)
        return min(table.released * self.block_size, table.num_tokens)

    def slot_mapping(self, session_id: str, start: int = 0, end: int | None = None) -> list[int]:
        """Flat slots (``block_id * block_size + offset``) of positions ``start..end-1``;
        RELEASED for released positions."""
        table = self._table(session_id)
        end = table.num_tokens if end is None else end
        if not 0 <= start <= end <= table.num_tokens:
            raise InvalidParamsError(
                f"positions {start}..{end} are outside session {session_id!r}'s "
                f"{table.num_tokens} tokens")
        return table.slots(start, end)

    def num_free_blocks_with_eviction(self) -> int:
        """Blocks an allocation can get now (free + cached)."""
        return self.pool.num_free_blocks_with_eviction()

    def can_allocate(self, n_blocks: int) -> bool:
        """Whether `n_blocks` new blocks can be had now, evicting cached ones if need be."""
        return self.pool.can_allocate(n_blocks)

    def blocks_needed(self, session_id: str, n_new_tokens: int) -> int:
        """New blocks `append_tokens` needs for `n_new_tokens` tokens (copy-on-write included)."""
        table = self._table(session_id)
        n, bs = table.num_tokens, self.block_size
        if n_new_tokens <= 0:
            return 0
        need = -(-(n + n_new_tokens) // bs) - len(table.block_ids)
        if n % bs and self.pool.ref_count(table.block_ids[-1]) > 1:
            need += 1
        return need

    def can_append(self, session_id: str, n_new_tokens: int) -> bool:
        """Whether `append_tokens` of `n_new_tokens` tokens would succeed now (never raises
        for lack of memory)."""
        return self.pool.can_allocate(self.blocks_needed(session_id, n_new_tokens))

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest chain of cached or live full blocks starting `token_ids`, and its length
        in tokens. A pure query: no ref counts change."""
        tokens = _as_tokens(token_ids)
        bs, parent = self.block_size, self._root
        blocks: list[int] = []
        for start in range(0, len(tokens) - bs + 1, bs):
            parent = hash_block_tokens(parent, tokens[start : start + bs])
            block = self.pool.lookup(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    # --- session lifecycle ---------------------------------------------------------------------

    def allocate(self, session_id: str) -> None:
        """Create an empty session."""
        self._new_id(session_id)
        self._tables[session_id] = BlockTable(self.block_size)

    def free(self, session_id: str) -> None:
        """Close the session: each of its blocks loses one holder (tail first). Blocks nobody
        holds become cached if hashed, else free."""
        table = self._table(session_id)
        self._truncate(table, 0, invalidate=False)
        del self._tables[session_id]

    def fork(self, src_id: str, dst_id: str) -> None:
        """Make `dst_id` a copy of `src_id` sharing every block (copy-on-write)."""
        src = self._table(src_id)
        self._new_id(dst_id)
        for block in src.held_ids:
            self.pool.incref(block)
        self._tables[dst_id] = src.copy()

    def truncate(self, session_id: str, n_tokens: int, *, invalidate: bool = False) -> None:
        """Rewind the session to its first `n_tokens` tokens, releasing blocks past them.

        `invalidate=True` says K/V at positions >= n_tokens was never written (a failed
        forward): the affected blocks' hashes are dropped so nobody reuses them.
        """
        table = self._table(session_id)
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
            raise InvalidParamsError(f"n_tokens must be an int, got {n_tokens!r}")
        if not 0 <= n_tokens <= table.num_tokens:
            raise InvalidParamsError(
                f"n_tokens must be in 0..{table.num_tokens} (session {session_id!r}'s length), "
                f"got {n_tokens}")
        if n_tokens and not self._can_continue(table, n_tokens):
            lowest = table.released * self.block_size + self.window - 1
            raise InvalidParamsError(
                f"session {session_id!r} gave back its first {table.released * self.block_size} "
                f"positions (out of the {self.window}-position window): rewind it to no fewer "
                f"than {lowest} tokens, or to 0 and prefill it again")
        self._truncate(table, n_tokens, invalidate=invalidate)

    def release_behind(self, session_id: str, next_pos: int) -> int:
        """Give back the session's blocks that lie wholly before what a token at `next_pos`
        (and every later one) attends to, `next_pos + 1 - window` on, and return how many
        leading positions are now released. Nothing without a window. Call it before planning a
        step whose first new row is at `next_pos`: the blocks it frees may go to another
        session's rows of the same step."""
        table = self._table(session_id)
        if not self.window:
            return 0
        first = min(next_pos, table.num_tokens) + 1 - self.window
        upto = max(0, first) // self.block_size
        if upto > table.released:
            gone = table.block_ids[table.released:upto]
            table.block_ids[table.released:upto] = [RELEASED] * len(gone)
            table.released = upto
            # hashed ones stay cached, evicted before every other cached block (a long
            # generation's deep blocks are worth least) and the deepest first: the prefix's
            # head, which every later match needs, goes last
            self.pool.release(gone, evict_first=True)
        return self.released_tokens(session_id)

    # --- writing -------------------------------------------------------------------------------

    def append_tokens(self, session_id: str, token_ids: Sequence[int]) -> SlotPlan:
        """Reserve slots for `token_ids` after the session's tokens; all of them are to compute.

        Allocates blocks as needed (all or nothing; `OutOfKVMemoryError` changes nothing).
        """
        table = self._table(session_id)
        return self._plan(session_id, table, table.num_tokens, _as_tokens(token_ids), reuse=False)

    def prefill_plan(self, session_id: str, token_ids: Sequence[int]) -> SlotPlan:
        """Make `token_ids` the session's whole context, computing as little as possible.

        Keeps the longest prefix the session already holds, then takes whole blocks from the
        prefix cache (live or cached), then reserves slots for the rest. At least the last token
        is always left to compute (the caller needs its logits). On `OutOfKVMemoryError`
        nothing changes.
        """
        table = self._table(session_id)
        context = _as_tokens(token_ids)
        held = table.token_ids
        keep = 0
        limit = min(len(held), len(context) - 1)
        while keep < limit and held[keep] == context[keep]:
            keep += 1
        if not self._can_continue(table, keep):
            keep = 0  # the first new token would attend to released positions: start over
        return self._plan(session_id, table, keep, context[keep:], reuse=True)

    # --- save / restore ------------------------------------------------------------------------

    def export_session(self, session_id: str) -> dict[str, Any]:
        """The session's bookkeeping as plain data (the backend saves K/V of `block_ids`, the
        released ones' being gone)."""
        table = self._table(session_id)
        return {
            "format": "llama-kv/1",
            "session_id": session_id,
            "block_size": self.block_size,
            "num_tokens": table.num_tokens,
            "token_ids": list(table.token_ids),
            "block_ids": list(table.block_ids),
            "released_blocks": table.released,
            "block_hashes": [h.hex() for h in table.block_hashes],
        }

    def import_session(self, session_id: str, token_ids: Sequence[int], *,
                       shared: bool = False) -> list[int]:
        """Create `session_id` holding `token_ids` in fresh blocks and return those block ids,
        in position order, for the backend to fill with the saved K/V (position p goes to slot
        ``block_ids[p // block_size] * block_size + p % block_size``). On `OutOfKVMemoryError`
        nothing changes.

        The table is private unless `shared`: K/V read from a file serves only this session,
        and its blocks never enter the prefix cache (a crafted file would otherwise answer
        other sessions' prompts). Pass shared=True only for K/V this process computed, at every
        position (not for a session that gave blocks back: export_session's released_blocks)."""
        self._new_id(session_id)
        tokens = _as_tokens(token_ids)
        need = -(-len(tokens) // self.block_size)
        if not self.pool.can_allocate(need):
            raise out_of_kv_memory(self.pool, need, f"importing session {session_id!r}")
        table = BlockTable(self.block_size, self.pool.allocate(need), tokens, shared=shared,
                           context=len(tokens))
        self._register_full_blocks(table)
        self._tables[session_id] = table
        return list(table.block_ids)

    # --- accounting ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Block counts, sessions and prefix-cache counters."""
        pool = self.pool
        return {
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_free": pool.num_free_blocks,
            "kv_blocks_cached": pool.num_cached_blocks,
            "kv_blocks_used": pool.num_used_blocks,
            "kv_block_size": pool.block_size,
            "kv_tokens": sum(t.num_tokens for t in self._tables.values()),
            "kv_evictions": pool.evictions,
            "sessions": len(self._tables),
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
            "prefix_cache_query_tokens": self._query_tokens,
            "prefix_cache_hit_tokens": self._hit_tokens,
        }

    def check(self) -> None:
        """Check the pool's and every table's invariants; raise RuntimeError on the first broken
        one."""
        pool = self.pool
        pool.check()
        holders = [0] * pool.num_blocks
        for sid, table in self._tables.items():
            try:
                table.check()
            except RuntimeError as e:
                raise RuntimeError(f"session {sid!r}: {e}") from None
            for block in table.held_ids:
                holders[block] += 1
            parent = self._root
            for i, h in enumerate(table.block_hashes):
                parent = hash_block_tokens(parent, table.token_ids[i * self.block_size :
                                                                   (i + 1) * self.block_size])
                if h != parent:
                    raise RuntimeError(f"session {sid!r}: hash of block {i} is not its tokens'")
                block = table.block_ids[i]
                pooled = None if block == RELEASED else pool.block_hash(block)
                if pooled is not None and pooled != h:
                    raise RuntimeError(
                        f"session {sid!r}: full block {table.block_ids[i]} is registered under "
                        "another prefix's hash")
        for block, n in enumerate(holders):
            if pool.ref_count(block) != n:
                raise RuntimeError(
                    f"block {block} has ref_count {pool.ref_count(block)} but {n} tables hold it")

    # --- internals -----------------------------------------------------------------------------

    def _table(self, session_id: str) -> BlockTable:
        try:
            return self._tables[session_id]
        except (KeyError, TypeError):
            raise SessionError(
                f"unknown or closed KV session {session_id!r}; allocate it first") from None

    def _new_id(self, session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidParamsError(f"session_id must be a non-empty str, got {session_id!r}")
        if session_id in self._tables:
            raise SessionError(f"KV session {session_id!r} already exists; free it first")

    def _can_continue(self, table: BlockTable, n: int) -> bool:
        """Whether a token at position n attends to held positions only."""
        return table.released * self.block_size <= max(0, n + 1 - self.window)

    def _truncate(self, table: BlockTable, n: int, *, invalidate: bool) -> None:
        bs = self.block_size
        keep_blocks = -(-n // bs)
        gone = [b for b in table.block_ids[keep_blocks:] if b != RELEASED]
        del table.block_ids[keep_blocks:]
        del table.token_ids[n:]
        table.context = min(table.context, n)
        del table.block_hashes[n // bs :]
        table.released = min(table.released, keep_blocks)
        if invalidate and n % bs and table.block_ids[-1] != RELEASED:
            self.pool.drop_hash(table.block_ids[-1])
        self.pool.release(reversed(gone), uncache=invalidate)
        if n == 0:
            table.shared = True  # nothing from outside is left

    def is_shared(self, session_id: str) -> bool:
        """Whether the session's full blocks enter the prefix cache (False for K/V from a
        file, until the session is truncated to nothing)."""
        return self._table(session_id).shared

    def _register_full_blocks(self, table: BlockTable) -> None:
        if not table.shared:
            return
        bs = self.block_size
        parent = table.block_hashes[-1] if table.block_hashes else self._root
        for i in range(len(table.block_hashes), table.num_tokens // bs):
            parent = hash_block_tokens(parent, table.token_ids[i * bs : (i + 1) * bs])
            table.block_hashes.append(parent)
            self.pool.register(table.block_ids[i], parent)

    def _plan(
        self, session_id: str, table: BlockTable, keep: int, new: list[int], *, reuse: bool
    ) -> SlotPlan:
        """Make the session hold its first `keep` tokens followed by `new`."""
        pool, bs = self.pool, self.block_size
        keep_blocks = -(-keep // bs)
        dropped = table.block_ids[keep_blocks:]  # released by truncating to `keep`
        freed = {b for b in dropped if b != RELEASED and pool.ref_count(b) == 1}

        # Whole blocks from the prefix cache, right after `keep` (only at a block boundary),
        # always leaving the last token to compute.
        hits: list[tuple[int, BlockHash]] = []
        if reuse and keep % bs == 0 and (table.shared or keep == 0):
            parent = table.block_hashes[keep // bs - 1] if keep else self._root
            for i in range(max(0, (len(new) - 1) // bs)):
                parent = hash_block_tokens(parent, new[i * bs : (i + 1) * bs])
                block = pool.lookup(parent)
                if block is None:
                    break
                hits.append((block, parent))
        n_hit = len(hits) * bs
        start = keep + n_hit
        n_after = keep + len(new)

        # The kept partial block receives writes: copy it if shared, unhash it if registered.
        last = table.block_ids[keep_blocks - 1] if keep % bs and start < n_after else None
        cow = last is not None and pool.ref_count(last) > 1
        need = -(-n_after // bs) - keep_blocks - len(hits) + int(cow)
        available = (pool.num_free_blocks_with_eviction() + len(freed)
                     - sum(1 for b, _ in hits if pool.is_cached(b) or b in freed))
        if need > available:
            raise out_of_kv_memory(
                pool, need, f"session {session_id!r} ({n_after} tokens)", available=available)

        if reuse:
            self._queries += 1
            self._query_tokens += n_after - keep
            self._hit_tokens += n_hit
            self._hits += int(bool(hits))
        self._truncate(table, keep, invalidate=False)
        for block, h in hits:
            pool.incref(block)
            table.block_ids.append(block)
            table.block_hashes.append(h)
        table.token_ids.extend(new[:n_hit])
        fresh = pool.allocate(need)
        copies: list[tuple[int, int]] = []
        if last is not None:
            if cow:
                dst = fresh.pop(0)
                copies.append((last, dst))
                table.block_ids[-1] = dst
                pool.release([last])
            else:
                pool.drop_hash(last)
        table.block_ids.extend(fresh)
        compute = new[n_hit:]
        table.token_ids.extend(compute)
        self._register_full_blocks(table)
        return SlotPlan(start, compute, table.slots(start, n_after), copies, n_hit)


def _as_tokens(token_ids: Sequence[int]) -> list[int]:
    tokens = list(token_ids)
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < _MAX_TOKEN:
            raise InvalidParamsError(
                f"token ids must be non-negative ints, got {t!r} at index {i}")
    return tokens
