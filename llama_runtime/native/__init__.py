"""The native backend: the CPU without torch (backend.py), registered here (nothing heavy is
imported until it is used)."""

from __future__ import annotations

from typing import Any

from llama_runtime.backend import Backend, BackendEntry, register
from llama_runtime.backends import CPU_DECODE, BackendInfo, describe_decode, runs_on_cpu
from llama_runtime.kernels.layout import KEPT_TYPES
from llama_runtime.kernels.library import DECODE_MODES

__all__: list[str] = []


def _info() -> BackendInfo:
    from llama_runtime.kernels.library import available_isas, isa, library

    try:
        library()
        kernels = (f"kernels built at install, running the {isa()} build (of "
                   f"{', '.join(available_isas())} on this CPU)")
        available = True
    except RuntimeError as e:  # not installed, or a LLAMA_ENGINE_ISA this CPU cannot run
        kernels, available = str(e), False
    return BackendInfo(
        name="native", available=available, devices=("cpu",), dtypes=("float32",),
        quant_native=KEPT_TYPES, paged_attention=True, compile=True,
        max_batch=32, default_eligible=True,
        note="CPU without torch: the fused native step and kernels over ctypes, for GGUF and "
             "HF safetensors models whose layers the fused step runs (docs/models.md); "
             "backend='auto' tries it first on a CPU once it passed the parity gate for the "
             "model (or hands the model to torch when it cannot run it); "
             f"{kernels} (LLAMA_ENGINE_ISA overrides); decode='auto' "
             f"runs {describe_decode(CPU_DECODE)} ({', '.join(DECODE_MODES)} selectable)",
    )


def _factory(**options: Any) -> Backend:
    from llama_runtime.native.backend import NativeBackend

    return NativeBackend(**options)


register(BackendEntry(
    name="native", info=_info, serves=runs_on_cpu, factory=_factory, order=0,
    options={"decode": ("auto", *DECODE_MODES), "weights": ("auto", "quantized"),
             "kv_dtype": ("auto", "float32", "float16"), "dtype": ("auto", "float32")}))
