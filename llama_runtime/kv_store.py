"""The KV cache's storage in host memory, for every CPU path (the fused step reads and writes it
in place; saved sessions read and write it by slot)."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

__all__ = ["KV_DTYPES", "HostKVStore"]

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


def _lazy_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An array over anonymous memory whose pages are only touched as they are written, in 4 KiB
    pages: numpy asks for transparent huge pages on large arrays, and then the first K/V write
    of a block would make 2 MiB resident in each of the layers' regions it touches."""
    dt = np.dtype(KV_DTYPES[dtype])
    buf = mmap.mmap(-1, max(1, int(np.prod(shape)) * dt.itemsize),
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(shape)


class HostKVStore:
    """K and V of every block: two arrays [layers, num_blocks, kv_heads, block_size, head_dim]
    (csrc/decode.h: a block keeps each KV head's rows together), over memory whose pages are
    touched, and counted in RSS, only as blocks are first written. The one store of K/V in host
    memory: the native backend's, and the torch backend's on a CPU (which views the same arrays
    as tensors)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: str) -> None:
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        self.k, self.v = _lazy_zeros(shape, dtype), _lazy_zeros(shape, dtype)
        self.dtype_name = dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write of a forked session's shared last block)."""
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def _at(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(slots, dtype=np.int64)
        return idx // self.block_size, idx % self.block_size

    def read(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """K, V [layers, len(slots), kv_heads, head_dim] as float32 (session save)."""
        blk, off = self._at(slots)
        # the two index arrays, apart, put their dimension first: [n, layers, heads, dim]
        return (self.k[:, blk, :, off].swapaxes(0, 1).astype(np.float32),
                self.v[:, blk, :, off].swapaxes(0, 1).astype(np.float32))

    def write(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        blk, off = self._at(slots)
        self.k[:, blk, :, off] = np.swapaxes(k, 0, 1)
        self.v[:, blk, :, off] = np.swapaxes(v, 0, 1)

    def kv_shape(self, n: int) -> tuple[int, ...]:
        """The shape read() returns for n slots."""
        return (self.k.shape[0], n, self.k.shape[2], self.k.shape[4])


