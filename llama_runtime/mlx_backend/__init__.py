"""The MLX backend: Metal on Apple silicon, MLX's CPU backend elsewhere (backend.py), registered
here. mlx is imported only when the backend is probed or used, and only when installed."""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Any

from llama_runtime.backend import Backend, BackendEntry, register
from llama_runtime.backends import METAL_DEVICES, BackendInfo

__all__ = ["mlx_installed"]

_INSTALL = "pip install 'llama-engine[mlx]' (on Linux: pip install 'mlx[cpu]')"


def mlx_installed() -> bool:
    try:
        return importlib.util.find_spec("mlx") is not None
    except (ImportError, ValueError):
        return False


def _info() -> BackendInfo:
    if not mlx_installed():
        return BackendInfo(
            name="mlx", available=False, devices=(), dtypes=(), quant_native=(),
            paged_attention=False, compile=False, max_batch=0, default_eligible=False,
            note=f"mlx is not installed: {_INSTALL}")
    try:
        import mlx.core as mx

        from llama_runtime.mlx_backend.backend import metal_available
        from llama_runtime.mlx_backend.weights import KEPT_TYPES
    except ImportError as e:  # an install without a usable core (mlx without its cpu extra)
        return BackendInfo(
            name="mlx", available=False, devices=(), dtypes=(), quant_native=(),
            paged_attention=False, compile=False, max_batch=0, default_eligible=False,
            note=f"mlx does not import ({e}): {_INSTALL}")
    metal = metal_available()
    return BackendInfo(
        name="mlx", available=True, devices=("metal", "cpu") if metal else ("cpu",),
        dtypes=("float32", "float16", "bfloat16"), quant_native=KEPT_TYPES,
        paged_attention=True, compile=False, max_batch=32, default_eligible=True,
        note=f"MLX {mx.__version__}: weights in MLX's affine layout multiplied by "
             "mx.quantized_matmul, paged K/V gathered by slot; "
             + ("Metal present" if metal else "no Metal here: MLX's CPU backend, slower than "
                "the native kernels on a CPU"))


def _serves(device: str) -> bool:
    return (device in ("auto", "cpu") or device in METAL_DEVICES) and mlx_installed()


def _factory(**options: Any) -> Backend:
    from llama_engine import UnsupportedBackendError

    info = _info()
    if not info.available:
        raise UnsupportedBackendError(f"backend='mlx' is not available: {info.note}")
    from llama_runtime.mlx_backend.backend import MLXBackend

    return MLXBackend(**options)


def _apple_silicon() -> bool:
    """A Mac with Apple silicon (where MLX runs Metal), seen without importing mlx."""
    return sys.platform == "darwin" and platform.machine() == "arm64" and mlx_installed()


register(BackendEntry(
    name="mlx", info=_info, serves=_serves, factory=_factory, order=20,
    accelerated=_apple_silicon,
    options={"decode": ("auto",),  # one arithmetic: the compute dtype's
             "weights": ("auto", "quantized", "dequant"),
             "kv_dtype": ("auto", "float32", "float16", "bfloat16"),
             "dtype": ("auto", "float32", "float16", "bfloat16")}))
