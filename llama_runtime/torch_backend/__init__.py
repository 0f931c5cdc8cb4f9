"""The torch backend: CPU and CUDA (backend.py), registered here; torch is imported only when
the backend is used (or probed, where it is installed)."""

from __future__ import annotations

from typing import Any

from llama_runtime.backend import Backend, BackendEntry, register
from llama_runtime.backends import (
    CPU_DECODE,
    BackendInfo,
    describe_decode,
    gpu_present,
    torch_installed,
)
from llama_runtime.kernels.layout import KEPT_TYPES
from llama_runtime.kernels.library import DECODE_MODES

__all__: list[str] = []


def _info() -> BackendInfo:
    if not torch_installed():
        return BackendInfo(
            name="torch", available=False, devices=(), dtypes=(), quant_native=(),
            paged_attention=False, compile=False, max_batch=0, default_eligible=False,
            note="torch is not installed: pip install 'llama-engine[torch]' adds it (CUDA, "
                 "bfloat16, models the native kernels do not run, the op-by-op reference)")
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return BackendInfo(
        name="torch", available=True, devices=tuple(devices),
        dtypes=("float32", "bfloat16", "float16"),
        quant_native=KEPT_TYPES,
        paged_attention=True, compile=True, max_batch=32, default_eligible=True,
        note="CPU: quantized weights and a fused native decode step (the C++ kernels "
             f"built at install; decode='auto' runs {describe_decode(CPU_DECODE)}); CUDA: "
             "op-by-op "
             "torch, weights dequantized to bfloat16",
    )




def _factory(**options: Any) -> Backend:
    from llama_runtime.backends import require_torch

    require_torch("backend='torch'")
    from llama_runtime.torch_backend.backend import TorchBackend

    return TorchBackend(**options)


register(BackendEntry(
    name="torch", info=_info, serves=lambda device: torch_installed(), factory=_factory,
    order=10, accelerated=lambda: gpu_present() and torch_installed(),
    options={"decode": ("auto", *DECODE_MODES, "torch"),
             "weights": ("auto", "dequant", "quantized"),
             "kv_dtype": ("auto", "float32", "bfloat16", "float16"),
             "dtype": ("auto", "float32", "bfloat16", "float16")}))
