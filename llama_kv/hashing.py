"""Stable hashes of full KV blocks, chained over the prefix.

The hash of block i is ``blake2b(hash of block i-1 || tokens of block i)``, so equal hashes mean
equal token prefixes up to the end of the block, hence equal K/V (for one model). The first
block's parent is a root hash derived from a namespace (e.g. a model id). Hashes are 16 bytes,
the same in every process and on every machine, so they can be saved with a session.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["BlockHash", "hash_block_tokens", "hash_token_blocks", "root_hash"]

BlockHash = bytes
_DIGEST_SIZE = 16
_VERSION = b"llama-kv/1\x00"


def root_hash(namespace: str = "") -> BlockHash:
    """The parent hash of a sequence's first block, for `namespace` (e.g. a model id)."""
    return hashlib.blake2b(_VERSION + namespace.encode(), digest_size=_DIGEST_SIZE).digest()


_ROOT = root_hash()


def hash_block_tokens(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Hash one block's `tokens` chained on `parent` (None: the default root)."""
    h = hashlib.blake2b(_ROOT if parent is None else parent, digest_size=_DIGEST_SIZE)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, *, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids` (a partial tail is not hashed)."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
