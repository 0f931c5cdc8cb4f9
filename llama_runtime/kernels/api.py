"""Calls into the kernels' C API (csrc/capi.cpp) over numpy arrays; the torch backend makes the
same calls through its tensors' data pointers (torch_backend/qweights.py)."""

from __future__ import annotations

import ctypes

import numpy as np

from llama_runtime.kernels.layout import PackedWeight
from llama_runtime.kernels.library import ACTS, LeWeight, library

__all__ = ["KINDS", "check", "dense_weight", "dequant", "gelu", "le_weight", "linear", "ptr"]

KINDS = {"q4": 1, "q8": 2, "q5": 3}
"""le_weight's kind of each packed layout (0: dense float32)."""


def ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def check(status: int) -> None:
    """Raise the library's message when a call returned -1 (a dim, kind or slot it refused)."""
    if status != 0:
        raise ValueError(library().le_error().decode())


def le_weight(p: PackedWeight) -> LeWeight:
    """The C API's view of a packed weight (it borrows the arrays: keep `p` alive)."""
    return LeWeight(KINDS[p.kind], int(p.d.dtype == np.float16), ptr(p.qs), ptr(p.d),
                    ptr(p.m), p.shape[0], p.shape[1], p.per, ptr(p.qh))


def dense_weight(a: np.ndarray) -> LeWeight:
    """The C API's view of a float32 [N, K] weight (borrowed: keep `a` alive)."""
    return LeWeight(0, 0, ptr(a), None, None, a.shape[0], a.shape[1], 0, None)


def linear(p: PackedWeight | np.ndarray, x: np.ndarray, *, acts: str) -> np.ndarray:
    """x [B, K] @ W.T by the library's kernel, the product the fused step computes with `acts`
    (a key of ACTS: float activations, or activations quantized per 32-block to int8 or int16).
    `p` is a packed weight, or a dense float32 [N, K] one (always the float kernel, as in the
    step)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(p, np.ndarray):
        p = np.ascontiguousarray(p, dtype=np.float32)
        w = dense_weight(p)
    else:
        w = le_weight(p)
    n, k = p.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [B, {k}], got {list(x.shape)}")
    out = np.empty((x.shape[0], n), dtype=np.float32)
    check(library().le_linear(ctypes.byref(w), ptr(x), x.shape[0], ptr(out), ACTS[acts]))
    return out


def gelu(x: np.ndarray, *, approximate: bool = False) -> np.ndarray:
    """GELU of a float32 array (erf, or the tanh approximation), computed in place when x is
    a contiguous float32 array already, else on a copy."""
    out = np.ascontiguousarray(x, dtype=np.float32)
    if not out.flags.writeable:
        out = out.copy()
    check(library().le_gelu(ptr(out), out.size, int(approximate)))
    return out


def dequant(p: PackedWeight) -> np.ndarray:
    """float32 [N, K]: a packed weight's values, widened as the float kernel widens them."""
    out = np.empty(p.shape, dtype=np.float32)
    check(library().le_dequant(ctypes.byref(le_weight(p)), ptr(out)))
    return out
