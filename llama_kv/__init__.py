"""llama_kv: the paged KV cache's bookkeeping, in plain ints and lists.

A `BlockPool` owns `num_blocks` fixed blocks of `block_size` token slots, their reference counts,
a free list and an LRU of cached (evictable, prefix-reusable) blocks. A `PagedKVCache` keeps one
`BlockTable` per session id and turns appends, prefills (with prefix sharing), forks
(copy-on-write), truncation and frees into `SlotPlan`s: which flat slots
(``block_id * block_size + offset``) the backend writes and which blocks it copies. The K/V
tensors themselves live in the backend, indexed by block id. Nothing here imports torch, mlx or
numpy.
"""

from llama_kv.block_pool import BlockPool
from llama_kv.block_table import BlockTable
from llama_kv.budget import AUTO_KV_FRACTION, kv_budget_blocks, kv_bytes_per_block, parse_bytes
from llama_kv.cache import PagedKVCache, SlotPlan
from llama_kv.hashing import hash_block_tokens, hash_token_blocks

__all__ = [
    "AUTO_KV_FRACTION",
    "BlockPool",
    "BlockTable",
    "PagedKVCache",
    "SlotPlan",
    "hash_block_tokens",
    "hash_token_blocks",
    "kv_budget_blocks",
    "kv_bytes_per_block",
    "parse_bytes",
]
