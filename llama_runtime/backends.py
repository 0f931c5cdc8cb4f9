"""The capability matrix: which backends exist, what each can do, which one `auto` picks."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

from llama_engine.errors import UnsupportedBackendError

__all__ = ["BackendInfo", "available_backends", "pick_backend", "pick_device"]


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
    max_batch: int
    default_eligible: bool
    """Passed the parity suite, so `auto` may pick it."""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _torch_info() -> BackendInfo:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return BackendInfo(
        name="torch", available=True, devices=tuple(devices),
        dtypes=("float32", "bfloat16", "float16"), quant_native=(),
        paged_attention=False, compile=False, max_batch=1, default_eligible=True,
        note="weights dequantized to the compute dtype at load",
    )


def _mlx_info() -> BackendInfo:
    found = importlib.util.find_spec("mlx") is not None
    return BackendInfo(
        name="mlx", available=False, devices=("metal", "cpu") if found else (),
        dtypes=(), quant_native=(), paged_attention=False, compile=False, max_batch=0,
        default_eligible=False, note="not implemented yet",
    )


def available_backends() -> list[BackendInfo]:
    return [_torch_info(), _mlx_info()]


def pick_backend(backend: str) -> str:
    infos = {b.name: b for b in available_backends()}
    if backend == "auto":
        for b in infos.values():
            if b.available and b.default_eligible:
                return b.name
        raise UnsupportedBackendError("no usable backend found; install torch==2.13.0")
    info = infos.get(backend)
    if info is None:
        raise UnsupportedBackendError(
            f"unknown backend {backend!r}; choose auto, {', '.join(infos)}")
    if not info.available:
        raise UnsupportedBackendError(
            f"backend {backend!r} is not available: {info.note}; use --backend torch or auto")
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
