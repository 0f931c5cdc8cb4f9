"""What every backend shares about the machine: the capability matrix's rows (`BackendInfo`),
CPU cores, whether a GPU or torch is present, the CPU decode default. The backends themselves
are registered in backend.py."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_engine.errors import InvalidParamsError, UnsupportedBackendError
from llama_runtime.kernels.library import DECODE_MODES

__all__ = [
    "CPU_DECODE",
    "METAL_DEVICES",
    "BackendInfo",
    "available_backends",
    "check_threads",
    "cpu_kv_dtype",
    "describe_decode",
    "gpu_present",
    "physical_cores",
    "pick_backend",
    "pick_device",
    "require_torch",
    "runs_on_cpu",
    "torch_installed",
]

METAL_DEVICES = ("metal", "gpu", "mps")
"""The names a run may give Apple's GPU (MLX's Metal device)."""

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
    """`auto` may try it on this machine (its probe passed); it serves a model only once it
    passes the parity gate for that model (parity.py, docs/architecture.md)."""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


def gpu_present() -> bool:
    """An NVIDIA GPU, seen without importing torch (its driver's device nodes)."""
    return Path("/dev/nvidiactl").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def runs_on_cpu(device: str) -> bool:
    """Whether a run asked for on `device` is a CPU run: "cpu", or "auto" on a machine without
    a GPU (or without torch, the only backend that runs one)."""
    return device == "cpu" or (device == "auto" and (not gpu_present() or not torch_installed()))


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


def available_backends() -> list[BackendInfo]:
    """What each registered backend can do on this machine (the capability matrix)."""
    from llama_runtime.backend import entries

    return [e.info() for e in entries()]


def pick_backend(backend: str) -> str:
    """A backend asked for by name, if it is registered and available here (else a typed error
    that says why); "auto" is create_engine's to resolve."""
    from llama_runtime.backend import entries

    names = [e.name for e in entries()]
    e = next((e for e in entries() if e.name == backend), None)
    if e is None:
        raise UnsupportedBackendError(
            f"unknown backend {backend!r}; choose auto, {', '.join(names)}")
    info = e.info()
    if not info.available:
        raise UnsupportedBackendError(f"backend {backend!r} is not available: {info.note}")
    return backend


def check_threads(threads: object) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InvalidParamsError(f"threads must be a positive integer, got {threads!r}")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedBackendError(
            f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if device in METAL_DEVICES:
        raise UnsupportedBackendError(
            f"device {device!r} is the MLX backend's (a Mac with Apple silicon, and pip install "
            "'llama-engine[mlx]'); the torch backend runs cpu or cuda")
    return device
