"""Paged KV storage of the torch backend and the step batch that attention reads it through.

The K and V of every block live in two tensors, [layers, num_blocks, kv_heads, block_size,
head_dim] (csrc/decode.h's layout: a block keeps each KV head's rows together), addressed by flat
slot `block_id * block_size + offset` (llama_kv hands out the slots).
One model forward serves a whole step: the new tokens of every sequence are flattened into N
rows; `StepBatch` knows, per sequence, which rows are its queries, which slots receive its new
keys and values, and which slots hold its whole context.

Attention gathers each sequence's context by slot. Decoding sequences (one new token each) are
batched into a single padded SDPA call per layer with a key-padding mask; sequences that prefill
a chunk get one causal call each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llama_runtime.kv_store import HostKVStore
from llama_runtime.step import AttentionPlan, SeqStep, WindowPlan

__all__ = ["PagedKVStore", "SeqStep", "StepBatch"]


class PagedKVStore:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        # torch.empty: pages are only touched (and counted in RSS) as blocks are first written
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.device = device

    @classmethod
    def over_host(cls, host: HostKVStore) -> PagedKVStore:
        """The host store's arrays as CPU tensors (the same memory: what one writes, the other
        reads)."""
        store = cls.__new__(cls)
        store.block_size, store.num_blocks = host.block_size, host.num_blocks
        store.k, store.v = torch.from_numpy(host.k), torch.from_numpy(host.v)
        store.device = torch.device("cpu")
        return store

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write of a forked session's shared last block)."""
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    @property
    def dtype_name(self) -> str:
        return str(self.k.dtype).removeprefix("torch.")

    def at(self, slots: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors of flat slots."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        return idx // self.block_size, idx % self.block_size

    def read(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """K, V [layers, len(slots), kv_heads, head_dim] at these slots, as float32 numpy
        arrays (session save)."""
        blk, off = self.at(list(slots))
        # the two index tensors, apart, put their dimension first: [n, layers, heads, dim]
        return (self.k[:, blk, :, off].transpose(0, 1).float().cpu().numpy(),
                self.v[:, blk, :, off].transpose(0, 1).float().cpu().numpy())

    def write(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        blk, off = self.at(list(slots))
        for dst, src in ((self.k, k), (self.v, v)):
            t = torch.from_numpy(np.ascontiguousarray(src)).to(self.device, dst.dtype)
            dst[:, blk, :, off] = t.transpose(0, 1)

    def kv_shape(self, n: int) -> tuple[int, ...]:
        """The shape read() returns for n slots."""
        return (self.k.shape[0], n, self.k.shape[2], self.k.shape[4])


class StepBatch:
    """Everything attention needs for one forward over several sequences (step.AttentionPlan's
    numpy plan as tensors on the store's device, built once a step, reused by every layer)."""

    def __init__(self, store: PagedKVStore, seqs: Sequence[SeqStep]) -> None:
        self.store = store
        self.plan = plan = AttentionPlan(seqs)
        self.n = plan.n
        dev = store.device
        self.write_at = store.at(torch.from_numpy(plan.write_slots).to(dev))
        self.logits_rows = torch.from_numpy(plan.logits_rows).to(dev)
        self.decode_rows = (torch.from_numpy(plan.decode_rows).to(dev)
                            if len(plan.decode_rows) else None)
        self._views: dict[int, _WindowView] = {}

    def view(self, window: int) -> _WindowView:
        """A window's gathers and masks (0: global), made once per window a step."""
        if window not in self._views:
            self._views[window] = _WindowView(self.store, self.plan.window(window))
        return self._views[window]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               scale: float, *, window: int = 0) -> torch.Tensor:
        # q: [N, Hq, D]; k, v: [N, Hkv, D]
        kc, vc = self.store.k[layer], self.store.v[layer]  # [blocks, Hkv, block_size, D]
        wb, wo = self.write_at
        kc[wb, :, wo] = k.to(kc.dtype)
        vc[wb, :, wo] = v.to(vc.dtype)
        out = torch.empty_like(q)
        view = self.view(window)
        if self.decode_rows is not None:
            qd = q.index_select(0, self.decode_rows)[:, :, None, :]  # [B, Hq, 1, D]
            db, do = view.decode_at
            kd = kc[db, :, do].transpose(1, 2).to(q.dtype)  # [B, W, Hkv, D] -> [B, Hkv, W, D]
            vd = vc[db, :, do].transpose(1, 2).to(q.dtype)
            if view.decode_pad is not None:
                kd, vd = kd.masked_fill(view.decode_pad, 0.0), vd.masked_fill(view.decode_pad, 0.0)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=view.decode_mask,
                                                scale=scale, enable_gqa=True)
            out.index_copy_(0, self.decode_rows, od[:, :, 0, :])
        for (r0, r1), (ctx, mask) in zip(self.plan.prefill_rows, view.prefills, strict=True):
            qp = q[r0:r1].transpose(0, 1)[None]  # [1, Hq, n, D]
            kp = kc[ctx[0], :, ctx[1]].transpose(0, 1)[None].to(q.dtype)
            vp = vc[ctx[0], :, ctx[1]].transpose(0, 1)[None].to(q.dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale,
                                                enable_gqa=True)
            out[r0:r1] = op[0].transpose(0, 1)
        return out.reshape(self.n, -1)


class _WindowView:
    """One window's plan as tensors: (block, offset) gathers and masks."""

    def __init__(self, store: PagedKVStore, plan: WindowPlan) -> None:
        dev = store.device
        self.decode_mask: torch.Tensor | None = None
        self.decode_pad: torch.Tensor | None = None
        if plan.decode_slots is not None:
            self.decode_at = store.at(torch.from_numpy(plan.decode_slots).to(dev))
            if plan.decode_valid is not None:
                valid = torch.from_numpy(plan.decode_valid).to(dev)
                self.decode_mask = valid[:, None, None, :]  # [B, 1, 1, W]: hide the padding
                # [B, 1, W, 1]: the padding, which reads slot 0 (whatever it holds: the store
                # is torch.empty, and a NaN there would survive the mask as 0 * NaN)
                self.decode_pad = ~valid[:, None, :, None]
        self.prefills = [(store.at(torch.from_numpy(ctx).to(dev)), torch.from_numpy(mask).to(dev))
                         for ctx, mask in plan.prefills]
