"""The MLX backend's place in the registry: not implemented yet (its info says so), so `auto`
never picks it and asking for it is a typed error."""

from __future__ import annotations

import importlib.util
from typing import Any

from llama_engine import UnsupportedBackendError
from llama_runtime.backend import Backend, BackendEntry, register
from llama_runtime.backends import BackendInfo

__all__: list[str] = []


def _info() -> BackendInfo:
    found = importlib.util.find_spec("mlx") is not None
    return BackendInfo(
        name="mlx", available=False, devices=("metal", "cpu") if found else (),
        dtypes=(), quant_native=(), paged_attention=False, compile=False, max_batch=0,
        default_eligible=False, note="not implemented yet",
    )




def _factory(**options: Any) -> Backend:
    raise UnsupportedBackendError("the MLX backend is not implemented yet; use backend='auto'")


register(BackendEntry(name="mlx", info=_info, serves=lambda device: False, factory=_factory,
                      order=20))
