"""Weights kept quantized in memory, and the compiled kernels that multiply them.

GGUF Q4_0, Q4_1, Q8_0 and Q4_K tensors are repacked at load (no requantization: the same values)
into `QWeight`s in the kernels' row-interleaved layout (csrc/qgemm.h). csrc/qgemm.cpp multiplies
them directly, two ways:
- exact: weights widened to float in registers (for many rows, once per 4-row panel) and
  multiplied with float activations: dequantize-then-matmul's arithmetic up to summation order
  (and one FMA rounding in d * q + m).
  Prompts always take this path.
- int8: activations quantized per 32-block to 8 bits and dot products on integers (llama.cpp's CPU
  scheme); the fused decode step uses it by default (see fused.py).
Either way a row's result depends only on that row. The kernels are compiled on first use with
torch's extension builder (cached by torch).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_models.checkpoint import RawTensor

__all__ = ["KEPT_QUANTIZED", "REPACKABLE", "QWeight", "kernels", "repack", "weight_path"]

log = logging.getLogger(__name__)

Q4_0, Q4_1, Q8_0, Q4_K = 2, 3, 8, 12  # gguf.GGMLQuantizationType values
REPACKABLE = frozenset({Q4_0, Q4_1, Q8_0, Q4_K})
GROUP = 4
"""Weight rows interleaved per group (csrc/qgemm.h)."""

_SOURCES = ("qgemm.cpp", "decode.cpp", "module.cpp")
_lock = threading.Lock()
_ext: Any = None
_ext_error: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernels() -> Any:
    """The compiled extension, building it on first use; raises RuntimeError if it cannot."""
    global _ext, _ext_error
    with _lock:
        if _ext is None and _ext_error is None:
            from torch.utils.cpp_extension import load

            # -fopenmp: at::parallel_for is a header template over OpenMP pragmas; without the
            # flag it compiles to a serial loop
            flags = ["-O3", "-fopenmp"]
            if {"avx2", "fma", "f16c"} <= _cpu_flags():
                flags += ["-mavx2", "-mfma", "-mf16c"]
            csrc = Path(__file__).parent / "csrc"
            # torch rebuilds when a source or a flag changes, not a header: name the headers'
            # contents in a flag
            headers = b"".join(p.read_bytes() for p in sorted(csrc.glob("*.h")))
            flags.append(f"-DLE_HEADERS={hashlib.sha256(headers).hexdigest()[:16]}")
            try:
                _ext = load(name="llama_engine_kernels",
                            sources=[str(csrc / f) for f in _SOURCES],
                            extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja...: report once, fall back
                _ext_error = f"{type(e).__name__}: {e}"
        if _ext is None:
            raise RuntimeError(f"the quantized kernels could not be built ({_ext_error})")
        return _ext


@dataclass(frozen=True, slots=True)
class QWeight:
    """A [N, K] weight in the kernels' layout (csrc/qgemm.h): rows interleaved in groups of four
    and zero-padded to a multiple of four."""

    kind: str  # "q4" or "q8"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def parts(self) -> list[torch.Tensor]:
        """The tensors the native kernels take: [qs, d] or [qs, d, m]."""
        return [self.qs, self.d] if self.m is None else [self.qs, self.d, self.m]

    def linear(self, x: torch.Tensor, *, int8_acts: bool = False) -> torch.Tensor:
        """x @ W.T by the compiled kernel: exact (float activations), or with activations
        quantized to int8 when asked. Each row's result depends only on that row, whatever the
        number of rows, so batching and prompt chunking never change a sequence's numbers."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        ext = kernels()
        if self.kind == "q4":
            f = ext.q4_linear if int8_acts else ext.q4_linear_f32
        else:
            f = ext.q8_linear if int8_acts else ext.q8_linear_f32
        return f(x2, *self.parts(), self.shape[0]).reshape(*lead, self.shape[0])

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, K] (or just `rows`)."""
        n, k = self.shape
        if rows is None:
            rows = torch.arange(n)
        nb = k // 32
        g, lane = rows // GROUP, rows % GROUP
        d = self.d.view(-1, nb, GROUP)[g, :, lane].float()  # [R, nb]
        if self.kind == "q8":
            q = self.qs.view(-1, nb, GROUP, 32)[g, :, lane].float()
            w = q * d[..., None]
        else:
            m = self.m.view(-1, nb, GROUP)[g, :, lane].float()  # type: ignore[union-attr]
            b = self.qs.view(-1, nb, GROUP, 16)[g, :, lane]
            q = torch.cat((b & 0x0F, b >> 4), dim=-1).float()
            w = q * d[..., None] + m[..., None]
        return w.reshape(rows.shape[0], k)


KEPT_QUANTIZED = "kept quantized (compiled kernel)"


def weight_path(raw: RawTensor, quantized: bool) -> str:
    """How the torch backend holds `raw` when quantized weights are on (or off)."""
    if (quantized and raw.qtype in REPACKABLE and len(raw.shape) == 2
            and not isinstance(raw.data, torch.Tensor)):
        return KEPT_QUANTIZED
    return "dequantized to the compute dtype"


def _split_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [n, k/256, 144] (d f16, dmin f16, 12 bytes of 6-bit scales and mins,
    128 bytes of nibbles) -> per-32 d, m [n, k/32] and our nibble order [n, k/32, 16]."""
    from gguf.quants import Q4_K as GGUF_Q4_K

    n, nsb, _ = blocks.shape
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = GGUF_Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    d_sub = (d.reshape(-1, 1) * sc.astype(np.float32)).reshape(n, nsb * 8)
    m_sub = -(dmin.reshape(-1, 1) * mn.astype(np.float32)).reshape(n, nsb * 8)
    # 64 elements per 32 bytes: low nibbles are one sub-block, high nibbles the next
    q = blocks[..., 16:].reshape(n, nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    q = (q & 0x0F).reshape(n, nsb * 8, 32)
    return d_sub, m_sub, (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def repack(raw: RawTensor) -> QWeight:
    """GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K bytes -> QWeight, exactly the stored values (Q4_K's
    sub-block scales are the float32 products d * scale and -dmin * min that its dequantization
    computes)."""
    n, k = raw.shape
    nb = k // 32
    data = np.asarray(raw.data).reshape(n, nb, -1)
    m: np.ndarray | None = None
    # scales stay float16 where the file has them so (exact, and 4 bytes a block fewer to read)
    if raw.qtype == Q8_0:  # d f16, 32 x int8
        d = data[..., 0:2].copy().view(np.float16)[..., 0]
        qs = data[..., 2:34].copy().view(np.int8)
    elif raw.qtype == Q4_1:  # d f16, m f16, 16 bytes of nibbles
        d = data[..., 0:2].copy().view(np.float16)[..., 0]
        m = data[..., 2:4].copy().view(np.float16)[..., 0]
        qs = data[..., 4:20]
    elif raw.qtype == Q4_0:  # d f16, 16 bytes of nibbles; w = d * (q - 8), -8d exact in f16
        d = data[..., 0:2].copy().view(np.float16)[..., 0]
        m = (d.astype(np.float32) * -8.0).astype(np.float16)
        if not np.array_equal(m.astype(np.float32), d.astype(np.float32) * -8.0):
            d, m = d.astype(np.float32), d.astype(np.float32) * -8.0  # overflowed: keep float32
        qs = data[..., 2:18]
    elif raw.qtype == Q4_K:
        d, m, qs = _split_q4_k(np.asarray(raw.data).reshape(n, k // 256, 144))
    else:
        raise ValueError(f"type {raw.qtype} cannot be repacked")
    kind = "q8" if m is None else "q4"

    def interleave(a: np.ndarray) -> torch.Tensor:
        # [n, nb, ...] rows -> [groups * 4, ...] with group g holding [nb, 4, ...]
        pad = -n % GROUP
        if pad:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)])
        g = a.shape[0] // GROUP
        a = a.reshape(g, GROUP, nb, -1).transpose(0, 2, 1, 3)
        return torch.from_numpy(np.ascontiguousarray(a).reshape(g * GROUP, -1))

    return QWeight(kind, interleave(qs), interleave(d[..., None]),
                   None if m is None else interleave(m[..., None]), (n, k))
