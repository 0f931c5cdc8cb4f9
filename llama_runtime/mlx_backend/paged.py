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
import threading
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from llama_runtime.step import AttentionPlan, SeqStep, WindowPlan

__all__ = ["CausalBatch", "MLXKVStore", "StepBatch"]

T = TypeVar("T")

_FIRST_SLOTS = 4096
"""Slots each layer's arrays hold before they first grow."""


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    @wraps(method)
    def run(self: MLXKVStore, *args: Any) -> T:
        with self.lock:
            return method(self, *args)

    return run


class MLXKVStore:
    """K and V of every layer, [slots, kv_heads, head_dim] in `dtype`. An MLX array update
    replaces the array, so every reader and writer holds `lock` (a step holds it throughout:
    a session saved or loaded meanwhile must not lose a layer's update)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: mx.Dtype) -> None:
        self.block_size, self.num_blocks = block_size, num_blocks
        self.lock = threading.RLock()
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

    @_locked
    def reserve(self, last_slot: int) -> None:
        """Grow every layer's arrays to hold `last_slot` (doubling, at most the budget)."""
        if last_slot >= self.capacity:
            raise IndexError(f"slot {last_slot} is past the store's {self.capacity}")
        held = self.held
        if last_slot < held:
            return
        grown = min(self.capacity, max(2 * held, last_slot + 1))
        pad = mx.zeros((grown - held, *self._row), dtype=self._dtype)
        self.k = [mx.concatenate((a, pad)) for a in self.k]
        self.v = [mx.concatenate((a, pad)) for a in self.v]
        mx.eval(self.k, self.v)

    @_locked
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

    @_locked
    def read(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """K, V [layers, len(slots), kv_heads, head_dim] as float32 numpy arrays."""
        idx = mx.array(np.asarray(slots, dtype=np.int32))
        return tuple(np.array(mx.stack([a[idx] for a in arrays]).astype(mx.float32))
                     for arrays in (self.k, self.v))  # type: ignore[return-value]

    @_locked
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
    """Everything attention needs for one forward over several sequences (step.AttentionPlan's
    numpy plan as MLX arrays, built once a step, reused by every layer)."""

    def __init__(self, store: MLXKVStore, seqs: Sequence[SeqStep]) -> None:
        self.store = store
        self.plan = plan = AttentionPlan(seqs)
        self.n = plan.n
        store.reserve(int(plan.write_slots.max()))
        self.write_at = _index(plan.write_slots)
        self.logits_rows = _index(plan.logits_rows)
        self.decode_rows = _index(plan.decode_rows) if len(plan.decode_rows) else None
        # attention's output rows come decode rows first, then each prompt chunk's: this puts
        # them back in the step's order
        order = np.concatenate([plan.decode_rows, *(np.arange(r0, r1)
                                                    for r0, r1 in plan.prefill_rows)])
        self._unpermute = None if (order == np.arange(self.n)).all() else \
            _index(np.argsort(order))
        self._views: dict[int, _WindowView] = {}

    def view(self, window: int) -> _WindowView:
        if window not in self._views:
            self._views[window] = _WindowView(self.plan.window(window))
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
        for (r0, r1), (ctx, mask) in zip(self.plan.prefill_rows, view.prefills, strict=True):
            qp = q[r0:r1].transpose(1, 0, 2)[None]  # [1, Hq, n, D]
            kp = kc[ctx].transpose(1, 0, 2)[None].astype(q.dtype)
            vp = vc[ctx].transpose(1, 0, 2)[None].astype(q.dtype)
            op = mx.fast.scaled_dot_product_attention(qp, kp, vp, scale=scale, mask=mask)
            parts.append(op[0].transpose(1, 0, 2))
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        if self._unpermute is not None:
            out = out[self._unpermute]
        return out.reshape(self.n, -1)


def _index(a: np.ndarray) -> mx.array:
    return mx.array(a.astype(np.int32))


class _WindowView:
    """One window's plan as MLX arrays: slot gathers and masks."""

    def __init__(self, plan: WindowPlan) -> None:
        self.decode_mask: mx.array | None = None
        if plan.decode_slots is not None:
            self.decode_at = _index(plan.decode_slots)
            if plan.decode_valid is not None:  # [B, 1, 1, W]: hide the padding
                self.decode_mask = mx.array(plan.decode_valid[:, None, None, :])
        self.prefills = [(_index(ctx), mx.array(mask)) for ctx, mask in plan.prefills]


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
