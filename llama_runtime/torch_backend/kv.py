"""Per-session KV storage of the torch backend, and the batch that attention reads it through.

Each session owns one contiguous buffer per K and V, [layers, kv_heads, capacity, head_dim],
grown by doubling up to the context length, so memory follows what a conversation really uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SequenceBatch", "SessionKV"]


class SessionKV:
    """The keys and values of one session. `length` tokens are valid."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype, initial: int = 256) -> None:
        self.shape = (n_layers, n_kv_heads, head_dim)
        self.max_tokens = max_tokens
        self.device, self.dtype = device, dtype
        self.length = 0
        cap = min(initial, max_tokens)
        self.k = torch.empty((n_layers, n_kv_heads, cap, head_dim), device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for n tokens in total."""
        if n <= self.capacity:
            return
        cap = min(max(n, 2 * self.capacity), self.max_tokens)
        k = torch.empty((*self.k.shape[:2], cap, self.k.shape[3]), device=self.device,
                        dtype=self.dtype)
        v = torch.empty_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)


@dataclass(slots=True)
class SequenceBatch:
    """One sequence's step: `n` new tokens written at positions start..start+n-1."""

    kv: SessionKV
    start: int
    n: int
    logits_rows: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def make(cls, kv: SessionKV, start: int, n: int, all_logits: bool = False) -> SequenceBatch:
        kv.reserve(start + n)
        dev = kv.device
        rows = torch.arange(n, device=dev) if all_logits else torch.tensor([n - 1], device=dev)
        mask = None
        if n > 1:  # causal, offset by what is cached: query i sees keys 0..start+i
            mask = torch.ones((n, start + n), dtype=torch.bool, device=dev).tril(start)
        return cls(kv, start, n, rows, mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               scale: float) -> torch.Tensor:
        # q: [n, Hq, D]; k, v: [n, Hkv, D]
        end = self.start + self.n
        self.kv.k[layer, :, self.start:end] = k.transpose(0, 1)
        self.kv.v[layer, :, self.start:end] = v.transpose(0, 1)
        keys = self.kv.k[layer, :, :end][None]
        values = self.kv.v[layer, :, :end][None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=self.mask, scale=scale,
            enable_gqa=True)
        return out[0].transpose(0, 1).reshape(self.n, -1)
