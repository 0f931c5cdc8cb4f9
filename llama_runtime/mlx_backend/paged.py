"""Paged K/V of the MLX backend, and the step batch its attention reads them through.

The same `llama_kv` block tables address it: a flat slot is `block * block_size + offset`. Each
layer keeps K and V as [slots, kv_heads, head_dim] arrays (slot-major: a step's new rows are one
scatter, a sequence's context one gather). The arrays grow, doubling, up to the budget's slots
as slots are first written, the way the host store's pages are only touched when written, so an
engine's RSS follows the K/V it holds rather than its budget.

Attention gathers each sequence's context by slot: decoding sequences (one new token each) in
one padded call per layer with a mask over the padding, prompt chunks one causal call each.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from llama_runtime.step import SeqStep

__all__ = ["CausalBatch", "MLXKVStore", "StepBatch"]

_FIRST_SLOTS = 4096
"""Slots each layer's arrays hold before they first grow."""


class MLXKVStore:
    """K and V of every layer, [slots, kv_heads, head_dim] in `dtype`."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: mx.Dtype) -> None:
        self.block_size, self.num_blocks = block_size, num_blocks
        self._dtype = dtype
        self._row = (n_kv_heads, head_dim)
        self.capacity = num_blocks * block_size
        held = min(self.capacity, _FIRST_SLOTS)
        self.k = [mx.zeros((held, *self._row), dtype=dtype) for _ in range(n_layers)]
        self.v = [mx.zeros((held, *self._row), dtype=dtype) for _ in range(n_layers)]
        mx.eval(self.k, self.v)

    @property
    def held(self) -> int:
        """Slots the arrays hold now."""
        return int(self.k[0].shape[0])

    @property
    def nbytes(self) -> int:
        """The budget's bytes (what the arrays grow to at most)."""
        return 2 * len(self.k) * self.capacity * int(np.prod(self._row)) * self._dtype.size

    @property
    def dtype_name(self) -> str:
        return str(self._dtype).removeprefix("mlx.core.")

    def reserve(self, last_slot: int) -> None:
        """Grow every layer's arrays to hold `last_slot` (doubling, at most the budget)."""
        held = self.held
        if last_slot < held:
            return
        grown = min(self.capacity, max(2 * held, last_slot + 1))
        pad = mx.zeros((grown - held, *self._row), dtype=self._dtype)
        self.k = [mx.concatenate((a, pad)) for a in self.k]
        self.v = [mx.concatenate((a, pad)) for a in self.v]
        mx.eval(self.k, self.v)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write of a forked session's shared last block)."""
        if not copies:
            return
        bs = self.block_size
        src = np.concatenate([np.arange(s * bs, (s + 1) * bs) for s, _ in copies])
        dst = np.concatenate([np.arange(d * bs, (d + 1) * bs) for _, d in copies])
        self.reserve(int(max(src.max(), dst.max())))
        s_idx, d_idx = mx.array(src.astype(np.int32)), mx.array(dst.astype(np.int32))
        for arrays in (self.k, self.v):
            for layer, a in enumerate(arrays):
                a[d_idx] = a[s_idx]
                arrays[layer] = a
        mx.eval(self.k, self.v)

    def read(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """K, V [layers, len(slots), kv_heads, head_dim] as float32 numpy arrays."""
        idx = mx.array(np.asarray(slots, dtype=np.int32))
        return tuple(np.array(mx.stack([a[idx] for a in arrays]).astype(mx.float32))
                     for arrays in (self.k, self.v))  # type: ignore[return-value]

    def write(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        if not len(slots):
            return
        self.reserve(int(max(slots)))
        idx = mx.array(np.asarray(slots, dtype=np.int32))
        for arrays, src in ((self.k, k), (self.v, v)):
            for layer, a in enumerate(arrays):
                a[idx] = mx.array(np.ascontiguousarray(src[layer])).astype(self._dtype)
                arrays[layer] = a
        mx.eval(self.k, self.v)

    def kv_shape(self, n: int) -> tuple[int, ...]:
        return (len(self.k), n, *self._row)


class StepBatch:
    """Everything attention needs for one forward over several sequences (built once a step,
    reused by every layer)."""

    def __init__(self, store: MLXKVStore, seqs: Sequence[SeqStep]) -> None:
        self.store = store
        self.n = sum(s.n_new for s in seqs)
        write = [x for s in seqs for x in s.write_slots]
        store.reserve(max(write))
        self.write_at = mx.array(np.asarray(write, dtype=np.int32))
        rows: list[int] = []
        decode_rows: list[int] = []
        self._decode_ctx: list[list[int]] = []
        self._prefill_ctx: list[tuple[int, int, list[int]]] = []
        order: list[int] = []  # the rows in the order attention produces them
        r = 0
        for s in seqs:
            if s.want_logits:
                rows.append(r + s.n_new - 1)
            if s.n_new == 1:
                decode_rows.append(r)
                self._decode_ctx.append(list(s.context_slots))
            else:
                self._prefill_ctx.append((r, r + s.n_new, list(s.context_slots)))
            r += s.n_new
        order = decode_rows + [x for r0, r1, _ in self._prefill_ctx for x in range(r0, r1)]
        self.logits_rows = mx.array(np.asarray(rows, dtype=np.int32))
        self.decode_rows = mx.array(np.asarray(decode_rows, dtype=np.int32)) \
            if decode_rows else None
        # attention's output rows come decode rows first, then each prompt chunk's: this
        # puts them back in the step's order
        self._unpermute = None if order == list(range(self.n)) else \
            mx.array(np.argsort(np.asarray(order)).astype(np.int32))
        self._views: dict[int, _WindowView] = {}

    def view(self, window: int) -> _WindowView:
        if window not in self._views:
            self._views[window] = _WindowView(self._decode_ctx, self._prefill_ctx, window)
        return self._views[window]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, layer: int, scale: float, *,
               window: int = 0) -> mx.array:
        # q: [N, Hq, D]; k, v: [N, Hkv, D]
        store = self.store
        kc, vc = store.k[layer], store.v[layer]
        kc[self.write_at] = k.astype(kc.dtype)
        vc[self.write_at] = v.astype(vc.dtype)
        store.k[layer], store.v[layer] = kc, vc
        view = self.view(window)
        parts: list[mx.array] = []
        if self.decode_rows is not None:
            qd = q[self.decode_rows][:, :, None, :]  # [B, Hq, 1, D]
            kd = kc[view.decode_at].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, Hkv, W, D]
            vd = vc[view.decode_at].transpose(0, 2, 1, 3).astype(q.dtype)
            od = mx.fast.scaled_dot_product_attention(qd, kd, vd, scale=scale,
                                                      mask=view.decode_mask)
            parts.append(od[:, :, 0, :])
        for (r0, r1, _), (ctx, mask) in zip(self._prefill_ctx, view.prefills, strict=True):
            qp = q[r0:r1].transpose(1, 0, 2)[None]  # [1, Hq, n, D]
            kp = kc[ctx].transpose(1, 0, 2)[None].astype(q.dtype)
            vp = vc[ctx].transpose(1, 0, 2)[None].astype(q.dtype)
            op = mx.fast.scaled_dot_product_attention(qp, kp, vp, scale=scale, mask=mask)
            parts.append(op[0].transpose(1, 0, 2))
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        if self._unpermute is not None:
            out = out[self._unpermute]
        return out.reshape(self.n, -1)


class _WindowView:
    """One window's gather indices and masks over a step's sequences (0: global)."""

    def __init__(self, decode_ctx: list[list[int]],
                 prefill_ctx: list[tuple[int, int, list[int]]], window: int) -> None:
        self.decode_mask: mx.array | None = None
        if decode_ctx:
            kept = [c[-window:] if window else c for c in decode_ctx]
            width = max(len(c) for c in kept)
            idx = np.zeros((len(kept), width), dtype=np.int32)  # padding reads slot 0
            valid = np.zeros((len(kept), width), dtype=bool)
            for i, c in enumerate(kept):
                idx[i, : len(c)] = c
                valid[i, : len(c)] = True
            self.decode_at = mx.array(idx)
            if not valid.all():  # [B, 1, 1, W]: hide the padding
                self.decode_mask = mx.array(valid[:, None, None, :])
        self.prefills: list[tuple[mx.array, mx.array]] = []
        for r0, r1, slots in prefill_ctx:
            n = r1 - r0
            start = len(slots) - n  # positions before the chunk
            first = max(0, start - window + 1) if window else 0  # the first position any sees
            mask = np.tril(np.ones((n, len(slots) - first), dtype=bool), start - first)
            if window:
                mask = np.triu(mask, start - first - window + 1)
            self.prefills.append((mx.array(np.asarray(slots[first:], dtype=np.int32)),
                                  mx.array(mask)))


class CausalBatch:
    """A `batch` for DecoderModel.forward over whole sequences laid end to end (decoder
    embeddings): each attends causally to its own keys, nothing touches the KV cache, every row
    comes out."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.spans = list(itertools.pairwise(np.cumsum([0, *lengths]).tolist()))
        self.logits_rows = mx.arange(int(sum(lengths)))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, layer: int, scale: float, *,
               window: int = 0) -> mx.array:
        parts = []
        for r0, r1 in self.spans:
            n = r1 - r0
            mask = np.tril(np.ones((n, n), dtype=bool))
            if window:
                mask = np.triu(mask, 1 - window)
            o = mx.fast.scaled_dot_product_attention(
                q[r0:r1].transpose(1, 0, 2)[None], k[r0:r1].transpose(1, 0, 2)[None],
                v[r0:r1].transpose(1, 0, 2)[None], scale=scale, mask=mx.array(mask))
            parts.append(o[0].transpose(1, 0, 2))
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        return out.reshape(q.shape[0], -1)
