"""Weights kept quantized in memory, and the compiled kernels that multiply them.

GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K tensors are repacked at load (no
requantization: the same values) into `QWeight`s in the kernels' layout (csrc/qgemm.h: 16-row
groups, a vector lane per row).
csrc/qgemm.cpp multiplies them directly, three ways:
- exact: float activations against weights widened to float (dequantize-then-matmul's
  arithmetic up to summation order, and one FMA rounding in d * q + m).
- int16: activations quantized per 32-block to 16-bit integers (two int8 digits each) and dot
  products on integers; the fused step uses it by default (see fused.py).
- int8: activations quantized per 32-block to 8 bits and dot products on integers (llama.cpp's CPU
  scheme).
Either way a row's result depends only on that row, and every build (AVX-512 VNNI, AVX2, plain
C++) gives the same bits. The kernels are the package's compiled library (llama_runtime/kernels),
called through the tensors' data pointers.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from llama_models.checkpoint import RawTensor
from llama_runtime.kernels.api import KINDS, check
from llama_runtime.kernels.layout import (
    FIFTH_START,
    GROUP,
    KEPT_QUANTIZED,
    REPACKABLE,
    RUN,
    pack,
    weight_path,
)
from llama_runtime.kernels.library import ACTS, LeWeight, library

__all__ = ["KEPT_QUANTIZED", "REPACKABLE", "QWeight", "dense_le_weight", "repack", "weight_path"]

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class QWeight:
    """A [N, K] weight in the kernels' layout (csrc/qgemm.h): rows interleaved in groups of 16
    and zero-padded to a multiple of 16."""

    kind: str  # "q4", "q5" or "q8"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    shape: tuple[int, int]
    qh: torch.Tensor | None = None  # q5's fifth bits

    @property
    def per(self) -> int:
        """Elements a scale: 32, or 16 (Q6_K's)."""
        return self.shape[1] * self.d.shape[0] // self.d.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts())

    def parts(self) -> list[torch.Tensor]:
        """The tensors the native kernels take: [qs, d] (q8), [qs, d, m] (q4) or
        [qs, d, m, qh] (q5)."""
        return [t for t in (self.qs, self.d, self.m, self.qh) if t is not None]

    def le_weight(self) -> LeWeight:
        """The C API's view of this weight (it borrows the tensors: keep self alive)."""
        n, k = self.shape
        return LeWeight(KINDS[self.kind], int(self.d.dtype == torch.float16), _ptr(self.qs),
                        _ptr(self.d), _ptr(self.m), n, k, self.per, _ptr(self.qh))

    def linear(self, x: torch.Tensor, *, acts: str = "exact") -> torch.Tensor:
        """x @ W.T by the compiled kernel with `acts` (a key of ACTS): float activations, or
        activations quantized per 32-block to int16 or int8. Each row's result depends only on
        that row, whatever the number of rows, so batching and prompt chunking never change a
        sequence's numbers."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        if x2.shape[1] != self.shape[1]:
            raise ValueError(f"x has {x2.shape[1]} columns, the weight has {self.shape[1]}")
        out = torch.empty((x2.shape[0], self.shape[0]), dtype=torch.float32)
        w = self.le_weight()
        check(library().le_linear(ctypes.byref(w), x2.data_ptr(), x2.shape[0], out.data_ptr(),
                                  ACTS[acts]))
        return out.reshape(*lead, self.shape[0])

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, K] (or just `rows`)."""
        n, k = self.shape
        if rows is None:
            rows = torch.arange(n)
        nb, per = k // 32, self.per
        g, lane = rows // GROUP, rows % GROUP
        d = self.d.view(-1, k // per, GROUP)[g, :, lane].float()  # [R, k / per]
        if self.kind == "q8":  # [G, nb, 8, 16, 4] -> [R, nb, 8, 4]
            q = self.qs.view(-1, nb, 8, GROUP, RUN)[g, :, :, lane].reshape(-1, k // per, per)
        else:  # [G, nb, 4, 16, 4]: low nibbles elements 0-15, high ones 16-31
            b = self.qs.view(-1, nb, 4, GROUP, RUN)[g, :, :, lane].reshape(-1, nb, 16)
            q = torch.cat((b & 0x0F, b >> 4), dim=-1)
            if self.qh is not None:  # [G, nb, 8 masks, 64 bits]: bit 4 * lane + i
                masks = self.qh.view(-1, nb, 8, 8)[g]  # [R, nb, 8, 8 bytes]
                bits = (masks[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
                bits = bits.reshape(-1, nb, 8, GROUP, RUN)
                bits = bits[torch.arange(len(rows)), :, :, lane].reshape(-1, nb, 32)
                q = q | (bits[..., _FIFTH_ELEMENT] << 4)
        # q * d is exact for every kept type (a few bits times the scale), so adding the offset
        # rounds once, as the kernels' fma(q, d, m) does
        w = q.float() * d[..., None]
        if self.m is not None:
            w = w + self.m.view(-1, nb, GROUP)[g, :, lane].float()[..., None]
        return w.reshape(rows.shape[0], k)


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the kernels read contiguous CPU tensors")
    return t.data_ptr()


def dense_le_weight(w: torch.Tensor) -> LeWeight:
    """The C API's view of a contiguous float32 [N, K] CPU tensor (borrowed: keep `w` alive)."""
    if w.dtype != torch.float32 or w.dim() != 2:
        raise ValueError("a dense weight must be a float32 [N, K] tensor")
    return LeWeight(0, 0, _ptr(w), None, None, w.shape[0], w.shape[1], 0, None)


_FIFTH_ELEMENT = torch.tensor([v * RUN + i for e in range(32) for v, start in
                               enumerate(FIFTH_START) for i in range(RUN) if start + i == e])
"""Block element e's place among q5's mask bits taken in mask order (FIFTH_START)."""


def repack(raw: RawTensor) -> QWeight:
    """GGUF bytes of a kept type -> QWeight (see kernels.layout.pack): exactly the stored
    values."""
    p = pack(raw)
    return QWeight(p.kind, torch.from_numpy(p.qs), torch.from_numpy(p.d),
                   None if p.m is None else torch.from_numpy(p.m), p.shape,
                   None if p.qh is None else torch.from_numpy(p.qh))
