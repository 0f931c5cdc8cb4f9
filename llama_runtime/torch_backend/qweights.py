"""Weights kept quantized in memory, and the compiled kernels that multiply them.

GGUF Q4_0, Q4_1 and Q8_0 tensors are repacked at load (no requantization: the same values) into
`QWeight`s that `csrc/qgemm.cpp` multiplies directly for few-row inputs (decode), widening the
weights to float in registers: the arithmetic of dequantize-then-matmul up to summation order,
so answers match the float reference. Many-row inputs (prefill) dequantize one matrix at a time
into a float temporary and use the BLAS GEMM. (The kernel file also has llama.cpp-style int8
activation variants, faster for batches but not exact; they are not used yet.) The
kernel is compiled on first use with torch's extension builder and cached by torch.
"""

from __future__ import annotations

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

Q4_0, Q4_1, Q8_0 = 2, 3, 8  # gguf.GGMLQuantizationType values
REPACKABLE = frozenset({Q4_0, Q4_1, Q8_0})
KERNEL_MAX_ROWS = 16
"""Inputs with more rows than this take the dequantize + GEMM path."""

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

            flags = ["-O3"]
            if {"avx2", "fma", "f16c"} <= _cpu_flags():
                flags += ["-mavx2", "-mfma", "-mf16c"]
            try:
                _ext = load(name="llama_engine_qgemm",
                            sources=[str(Path(__file__).parent / "csrc" / "qgemm.cpp")],
                            extra_cflags=flags, verbose=False)
            except Exception as e:  # no compiler, no ninja...: report once, fall back
                _ext_error = f"{type(e).__name__}: {e}"
        if _ext is None:
            raise RuntimeError(f"the quantized kernels could not be built ({_ext_error})")
        return _ext


@dataclass(frozen=True, slots=True)
class QWeight:
    """A [N, K] weight in the kernel's layout (see csrc/qgemm.cpp)."""

    kind: str  # "q4" or "q8"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            ext = kernels()
            if self.kind == "q4":
                y = ext.q4_linear_f32(x2, self.qs, self.d, self.m)
            else:
                y = ext.q8_linear_f32(x2, self.qs, self.d)
        else:
            ext = kernels()
            w = (ext.q4_dequant(self.qs, self.d, self.m) if self.kind == "q4"
                 else ext.q8_dequant(self.qs, self.d))
            y = torch.nn.functional.linear(x2, w)
        return y.reshape(*lead, self.shape[0])

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, K] (or just `rows`)."""
        qs = self.qs if rows is None else self.qs[rows]
        d = self.d if rows is None else self.d[rows]
        n = qs.shape[0]
        if self.kind == "q8":
            w = qs.view(n, -1, 32).float() * d[..., None]
        else:
            m = self.m if rows is None else self.m[rows]  # type: ignore[index]
            b = qs.view(n, -1, 16)
            q = torch.cat((b & 0x0F, b >> 4), dim=-1).float()
            w = q * d[..., None] + m[..., None]  # type: ignore[index]
        return w.reshape(n, self.shape[1])


KEPT_QUANTIZED = "kept quantized (compiled kernel)"


def weight_path(raw: RawTensor, quantized: bool) -> str:
    """How the torch backend holds `raw` when quantized weights are on (or off)."""
    if (quantized and raw.qtype in REPACKABLE and len(raw.shape) == 2
            and not isinstance(raw.data, torch.Tensor)):
        return KEPT_QUANTIZED
    return "dequantized to the compute dtype"


def repack(raw: RawTensor) -> QWeight:
    """GGUF Q4_0 / Q4_1 / Q8_0 bytes -> QWeight, exactly the stored values."""
    n, k = raw.shape
    nb = k // 32
    data = np.asarray(raw.data).reshape(n, nb, -1)
    if raw.qtype == Q8_0:  # d f16, 32 x int8
        d = data[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = data[..., 2:34].copy().view(np.int8).reshape(n, k)
        return QWeight("q8", torch.from_numpy(qs), torch.from_numpy(d), None, (n, k))
    if raw.qtype == Q4_1:  # d f16, m f16, 16 bytes of nibbles
        d = data[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = data[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = data[..., 4:20].copy().reshape(n, k // 2)
    elif raw.qtype == Q4_0:  # d f16, 16 bytes of nibbles; w = d * (q - 8)
        d = data[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = -8.0 * d
        qs = data[..., 2:18].copy().reshape(n, k // 2)
    else:
        raise ValueError(f"type {raw.qtype} cannot be repacked")
    return QWeight("q4", torch.from_numpy(np.ascontiguousarray(qs)), torch.from_numpy(d),
                   torch.from_numpy(np.ascontiguousarray(m)), (n, k))
