from __future__ import annotations

import pytest

from llama_engine.errors import InvalidParamsError
from llama_kv import AUTO_KV_FRACTION, kv_budget_blocks, kv_bytes_per_block, parse_bytes


def test_bytes_per_block_smollm2_135m_fp16() -> None:
    # 30 layers, 3 KV heads of 64, float16, 16-token blocks
    n = kv_bytes_per_block(n_layers=30, n_kv_heads=3, head_dim=64, dtype_bytes=2, block_size=16)
    assert n == 2 * 30 * 16 * 3 * 64 * 2 == 368_640


@pytest.mark.parametrize("field", ["n_layers", "n_kv_heads", "head_dim", "dtype_bytes",
                                   "block_size"])
def test_bytes_per_block_rejects_non_positive(field: str) -> None:
    kwargs = {"n_layers": 2, "n_kv_heads": 2, "head_dim": 8, "dtype_bytes": 4, "block_size": 16}
    kwargs[field] = 0
    with pytest.raises(InvalidParamsError, match=field):
        kv_bytes_per_block(**kwargs)


@pytest.mark.parametrize(("text", "n"), [
    ("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2), ("512 mib", 512 * 1024**2),
    ("1.5GB", 1_500_000_000), ("64m", 64 * 1024**2), ("1000000", 1_000_000), ("10kB", 10_000),
    ("3B", 3), ("1TiB", 1024**4),
])
def test_parse_bytes(text: str, n: int) -> None:
    assert parse_bytes(text) == n


def test_budget_in_bytes_and_sizes() -> None:
    assert kv_budget_blocks(10_000, bytes_per_block=1000) == 10
    assert kv_budget_blocks(10_999, bytes_per_block=1000) == 10
    assert kv_budget_blocks("2GiB", bytes_per_block=1024) == 2 * 1024**2
    assert kv_budget_blocks("512MiB", bytes_per_block=368_640) == 512 * 1024**2 // 368_640


def test_budget_auto_and_percent_use_available_bytes() -> None:
    assert AUTO_KV_FRACTION == 0.5
    assert kv_budget_blocks("auto", bytes_per_block=1000, available_bytes=10_000) == 5
    assert kv_budget_blocks("AUTO", bytes_per_block=1000, available_bytes=10_000) == 5
    assert kv_budget_blocks("30%", bytes_per_block=1000, available_bytes=10_000) == 3
    with pytest.raises(InvalidParamsError, match="available_bytes"):
        kv_budget_blocks("auto", bytes_per_block=1000)
    with pytest.raises(InvalidParamsError, match=r"\(0, 100\]"):
        kv_budget_blocks("150%", bytes_per_block=1000, available_bytes=10_000)


@pytest.mark.parametrize("garbage", ["lots", "2XB", "GiB", "", "-5MiB", None, 1.5, True, [1]])
def test_budget_garbage_raises(garbage: object) -> None:
    with pytest.raises(InvalidParamsError, match="kv_memory|memory size"):
        kv_budget_blocks(garbage, bytes_per_block=1000)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -1, 999, "999B"])
def test_budget_below_one_block_raises(budget: int | str) -> None:
    with pytest.raises(InvalidParamsError, match="holds no KV block"):
        kv_budget_blocks(budget, bytes_per_block=1000)


def test_bad_bytes_per_block_raises() -> None:
    with pytest.raises(InvalidParamsError, match="bytes_per_block"):
        kv_budget_blocks(1000, bytes_per_block=0)
