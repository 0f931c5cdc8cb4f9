"""The capability matrix: which backends exist, what each can do, which one `auto` picks."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_engine.errors import UnsupportedBackendError
from llama_runtime.kernels.library import DECODE_MODES

__all__ = ["CPU_DECODE", "BackendInfo", "available_backends", "cpu_kv_dtype", "describe_decode",
           "gpu_present", "physical_cores", "pick_backend", "pick_device", "require_torch",
           "torch_installed"]

CPU_DECODE = "mixed"
"""What decode="auto" runs on a CPU in float32 (the fused native step, either backend): prompt
tokens with float activations, so every generated token attends to the float model's K/V, and
generated tokens with 16-bit activations per 32-block: the float model's greedy tokens as often
as float arithmetic gives them (docs/performance.md), in 1.1x int8's time a decode step and
~1.5x int16's a prompt on AVX-512 VNNI."""


def describe_decode(decode: str) -> str:
    """A decode mode (a key of DECODE_MODES) in words, for `info` and the bench JSON."""
    generated, prompt = DECODE_MODES[decode]
    if generated == prompt:
        return f"{decode}: {generated} activations for prompts and generated tokens"
    return f"{decode}: {prompt} activations for prompts, {generated} for generated tokens"


def cpu_kv_dtype(decode: str) -> str:
    """What kv_dtype="auto" means beside the fused CPU step running `decode` (a key of
    DECODE_MODES):
    float16 beside int8, as llama.cpp keeps K/V (half the bytes attention reads, at a rounding
    well inside the int8 products' own error); float32 beside the others, whose point is the
    float model's own tokens."""
    return "float16" if decode == "int8" else "float32"


@dataclass(frozen=True, kw_only=True)
class BackendInfo:
    name: str
    available: bool
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    quant_native: tuple[str, ...]
    """GGUF types multiplied without dequantizing to a float copy first."""
    paged_attention: bool
    compile: bool
    """Compiled kernels or a compiled decode step."""
    max_batch: int
    default_eligible: bool
    """Passed the parity suite, so `auto` may pick it."""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _torch_info() -> BackendInfo:
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
        quant_native=("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K"),
        paged_attention=True, compile=True, max_batch=32, default_eligible=True,
        note="CPU: quantized weights and a fused native decode step (the C++ kernels "
             f"built at install; decode='auto' runs {describe_decode(CPU_DECODE)}); CUDA: "
             "op-by-op "
             "torch, weights dequantized to bfloat16",
    )


def _native_info() -> BackendInfo:
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
        quant_native=("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K"), paged_attention=True, compile=True,
        max_batch=32, default_eligible=True,
        note="CPU without torch: the torch backend's fused native step and kernels (the same "
             "bits), one library driven over ctypes; "
             "GGUF models whose layers the fused step runs (docs/models.md). backend='auto' "
             "tries it first on a CPU and hands anything else to torch; "
             f"{kernels} (LLAMA_ENGINE_ISA overrides); decode='auto' "
             f"runs {describe_decode(CPU_DECODE)} ({', '.join(DECODE_MODES)} selectable)",
    )


def _mlx_info() -> BackendInfo:
    found = importlib.util.find_spec("mlx") is not None
    return BackendInfo(
        name="mlx", available=False, devices=("metal", "cpu") if found else (),
        dtypes=(), quant_native=(), paged_attention=False, compile=False, max_batch=0,
        default_eligible=False, note="not implemented yet",
    )


def physical_cores() -> int:
    """Physical CPU cores (not SMT siblings) this process may run on: the default thread count,
    as llama.cpp's."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            return len(allowed) or os.cpu_count() or 1
    return len(cores) or os.cpu_count() or 1


_NATIVE_OPTIONS = {"decode": ("auto", *DECODE_MODES), "weights": ("auto", "quantized"),
                   "kv_dtype": ("auto", "float32", "float16"), "dtype": ("auto", "float32")}


def gpu_present() -> bool:
    """An NVIDIA GPU, seen without importing torch (its driver's device nodes)."""
    return Path("/dev/nvidiactl").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def torch_installed() -> bool:
    """Whether torch can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        return False


def require_torch(what: str) -> None:
    """Raise a typed error naming the extra to install when torch is not installed."""
    if not torch_installed():
        raise UnsupportedBackendError(
            f"{what} needs the torch backend, and torch is not installed; install it with "
            "pip install 'llama-engine[torch]' (on a CPU: pip install torch==2.13.0 first)")


def native_may_serve(device: str, options: dict[str, object]) -> bool:
    """Whether backend="auto" tries the native backend first: a CPU run (device "cpu", or
    "auto" on a machine without a GPU), options it supports, and the installed kernels. The model
    itself is checked when it loads (GGUF, Llama family); torch takes over if it is refused."""
    if device not in ("auto", "cpu") or (device == "auto" and gpu_present()):
        return False
    if any(k in options and options[k] not in ok for k, ok in _NATIVE_OPTIONS.items()):
        return False
    return _native_info().available


_INFOS = {"torch": _torch_info, "native": _native_info, "mlx": _mlx_info}


def available_backends() -> list[BackendInfo]:
    return [info() for info in _INFOS.values()]


def pick_backend(backend: str) -> str:
    if backend in _INFOS and backend != "torch":  # answer without importing torch
        infos = {backend: _INFOS[backend]()}
    else:
        infos = {b.name: b for b in available_backends()}
    if backend == "auto":
        for b in infos.values():
            if b.available and b.default_eligible:
                return b.name
        raise UnsupportedBackendError(
            "no usable backend found: the package's kernels are not installed (reinstall it) "
            "and neither is torch (pip install 'llama-engine[torch]')")
    info = infos.get(backend)
    if info is None:
        raise UnsupportedBackendError(
            f"unknown backend {backend!r}; choose auto, {', '.join(_INFOS)}")
    if not info.available:
        raise UnsupportedBackendError(
            f"backend {backend!r} is not available: {info.note}")
    return backend


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedBackendError(
            f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if device == "metal":
        raise UnsupportedBackendError(
            "device 'metal' needs the MLX backend, which is not available yet; use --device cpu")
    return device
