"""A session's block table: which pool blocks hold its tokens' K/V, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_kv.hashing import BlockHash

__all__ = ["RELEASED", "BlockTable"]

RELEASED = -1
"""The block id (and slot) of a released position: its K/V was given back because no later token
can attend to it (sliding windows on every layer, `PagedKVCache.release_behind`)."""


@dataclass(slots=True)
class BlockTable:
    """One session's view of the pool.

    Position ``p`` lives in block ``block_ids[p // block_size]`` at offset ``p % block_size``,
    i.e. at flat slot ``block_ids[p // block_size] * block_size + p % block_size``.

    The first `released` blocks may have been given back (RELEASED in block_ids): their
    positions are out of every layer's window for every later token. The tokens and the prefix
    hashes stay, so the chain goes on and the blocks, still cached, can serve other prompts.

    A table is *shared* (its full blocks are registered for prefix sharing) unless it holds K/V
    the engine did not compute itself (a session loaded from a file): a private table registers
    nothing, since its K/V (and everything computed after it) is only as good as the file. It
    becomes shared again once truncated to nothing.

    Invariants (checked by `check`):
      - ``len(block_ids) == ceil(num_tokens / block_size)``;
      - ``len(block_hashes) == num_tokens // block_size`` (one chained hash per full block) when
        shared, 0 when private;
      - ``block_ids[:released]`` are RELEASED, the others real, and none appears twice.
    """

    block_size: int
    block_ids: list[int] = field(default_factory=list)  # block i holds positions [i*bs, (i+1)*bs)
    token_ids: list[int] = field(default_factory=list)  # the tokens whose K/V the blocks hold
    block_hashes: list[BlockHash] = field(default_factory=list)  # chain hash per full block
    shared: bool = True  # False: K/V from outside (a session file); never registered
    released: int = 0  # leading blocks given back (RELEASED)
    context: int = 0
    """The session's context: its first `context` tokens have K/V written, or being written by
    the step underway (the rest of token_ids is planned for later steps). Callers see these
    tokens as Session.tokens."""

    @property
    def num_tokens(self) -> int:
        """Tokens held (K/V written, or reserved by the latest plan)."""
        return len(self.token_ids)

    @property
    def held_ids(self) -> list[int]:
        """The blocks the table holds (the released ones left out), in position order."""
        return self.block_ids[self.released:]

    def slots(self, start: int, end: int) -> list[int]:
        """Flat slots of positions ``start..end-1`` (RELEASED for released positions)."""
        bs, ids = self.block_size, self.block_ids
        return [RELEASED if ids[p // bs] == RELEASED else ids[p // bs] * bs + p % bs
                for p in range(start, end)]

    def copy(self) -> BlockTable:
        """A table holding the same blocks (the caller adjusts ref counts)."""
        return BlockTable(self.block_size, list(self.block_ids), list(self.token_ids),
                          list(self.block_hashes), self.shared, self.released, self.context)

    def check(self) -> None:
        """Raise RuntimeError if the table's own invariants are broken."""
        n, bs = self.num_tokens, self.block_size
        if len(self.block_ids) != -(-n // bs):
            raise RuntimeError(
                f"table holds {n} tokens in {len(self.block_ids)} blocks; "
                f"expected ceil({n}/{bs}) = {-(-n // bs)}")
        want = n // bs if self.shared else 0
        if len(self.block_hashes) != want:
            raise RuntimeError(
                f"table has {len(self.block_hashes)} block hashes for {n // bs} full blocks "
                f"({'shared' if self.shared else 'private'})")
        held = self.held_ids
        if any(b != RELEASED for b in self.block_ids[:self.released]) or RELEASED in held:
            raise RuntimeError(f"table's first {self.released} blocks are not exactly the "
                               f"released ones: {self.block_ids}")
        if len(set(held)) != len(held):
            raise RuntimeError(f"table holds a block twice: {self.block_ids}")
        if not 0 <= self.context <= n:
            raise RuntimeError(f"table's context of {self.context} tokens is not within its {n}")
