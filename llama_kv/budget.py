"""Sizing the pool: bytes per block, and how many blocks a KV memory budget buys.

This package cannot ask a device how much memory it has; the backend passes `available_bytes`
(free device memory, or RAM on CPU) when the budget is relative ("auto" or a percentage).
"""

from __future__ import annotations

import re

from llama_engine.errors import InvalidParamsError

__all__ = ["AUTO_KV_FRACTION", "kv_budget_blocks", "kv_bytes_per_block", "parse_bytes"]

AUTO_KV_FRACTION = 0.5  # "auto" gives the KV cache this fraction of `available_bytes`

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")


def kv_bytes_per_block(
    *, n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int = 16
) -> int:
    """Bytes of K and V for one block over all layers:
    ``2 * n_layers * block_size * n_kv_heads * head_dim * dtype_bytes``."""
    dims = {"n_layers": n_layers, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
            "dtype_bytes": dtype_bytes, "block_size": block_size}
    for name, value in dims.items():
        _check_positive(name, value)
    return 2 * n_layers * block_size * n_kv_heads * head_dim * dtype_bytes


def parse_bytes(text: str) -> int:
    """Parse a size such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"64m"`` or ``"1000000"``.

    KiB/MiB/GiB/TiB and bare K/M/G/T are powers of 1024; kB/MB/GB/TB are powers of 1000.
    """
    m = _SIZE.fullmatch(text.lower()) if isinstance(text, str) else None
    if m is None or m.group(2) not in _UNITS:
        raise InvalidParamsError(
            f"a memory size must look like '2GiB', '512MiB' or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def kv_budget_blocks(
    budget: int | str, *, bytes_per_block: int, available_bytes: int | None = None
) -> int:
    """How many blocks of `bytes_per_block` fit in `budget`.

    `budget` is a number of bytes, a size string (``"2GiB"``), a percentage of `available_bytes`
    (``"30%"``), or ``"auto"`` (`AUTO_KV_FRACTION` of `available_bytes`). Raises
    `InvalidParamsError` for anything else, or when the budget holds no block at all.
    """
    _check_positive("bytes_per_block", bytes_per_block)
    if isinstance(budget, bool) or not isinstance(budget, int | str):
        raise InvalidParamsError(
            f"kv_memory must be a number of bytes, a size like '2GiB', a percentage or 'auto', "
            f"got {budget!r}")
    fraction: float | None = None
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        fraction = AUTO_KV_FRACTION
    elif isinstance(budget, str) and (m := _PERCENT.fullmatch(budget)):
        fraction = float(m.group(1)) / 100
        if not 0 < fraction <= 1:
            raise InvalidParamsError(f"kv_memory percentage must be in (0, 100], got {budget!r}")
    if fraction is not None:
        if available_bytes is None:
            raise InvalidParamsError(
                f"kv_memory={budget!r} is relative to available memory, but none was given; "
                "pass available_bytes=... or give a size such as '2GiB'")
        if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) \
                or available_bytes < 0:
            raise InvalidParamsError(
                f"available_bytes must be a non-negative int, got {available_bytes!r}")
        n_bytes = int(available_bytes * fraction)
    else:
        n_bytes = budget if isinstance(budget, int) else parse_bytes(budget)
    blocks = n_bytes // bytes_per_block
    if blocks < 1:
        raise InvalidParamsError(
            f"kv_memory={budget!r} ({n_bytes} bytes) holds no KV block of {bytes_per_block} "
            "bytes; raise kv_memory or use a smaller block_size")
    return blocks


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParamsError(f"{name} must be a positive int, got {value!r}")
