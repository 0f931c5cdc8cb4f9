"""Vectorized torch dequantization of GGUF tensor data.

Each supported ggml type is decoded block-wise with tensor ops only (no numpy, no `.item()`, no
Python loop over blocks), so the same code runs on CPU and CUDA tensors. The block layouts follow
ggml's `ggml-common.h` / `ggml-quants.c`; every decoder is checked bit-for-bit against the numpy
reference in `gguf.quants` (tests/llama_models/test_dequant.py), including the order of the float
operations, so results are identical, not just close.

Layouts (`d`, `m`, `dmin` are little-endian f16; `q` runs over the low nibbles of `qs`, then
the high nibbles; `bit(qh, j)` is bit j of qh read as a little-endian uint32):
  - Q4_0  (32):  d, qs[16]            x = (q - 8) * d
  - Q4_1  (32):  d, m, qs[16]         x = q * d + m
  - Q5_0  (32):  d, qh[4], qs[16]     x = ((q | bit(qh, j) << 4) - 16) * d
  - Q5_1  (32):  d, m, qh[4], qs[16]  x = (q | bit(qh, j) << 4) * d + m
  - Q8_0  (32):  d, qs[32] (int8)     x = q * d
  - Q4_K (256):  d, dmin, scales[12], qs[128]          8 sub-blocks of 32, 6-bit scale/min each
  - Q5_K (256):  d, dmin, scales[12], qh[32], qs[128]  as Q4_K plus a 5th bit from qh
  - Q6_K (256):  ql[128], qh[64], scales[16] (int8), d  16 sub-blocks of 16; `d` comes last
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import gguf
import gguf.quants
import torch

from llama_engine.errors import UnsupportedQuantizationError, WeightLoadError

__all__ = ["SUPPORTED_TYPES", "dequantize", "row_bytes"]

log = logging.getLogger(__name__)

_Q = gguf.GGMLQuantizationType
_QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 little-endian half floats -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] uint8 -> [n, 2k] uint8: all low nibbles first, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., k, 8] uint8 bits, least significant first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-1) >> shifts) & 1


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 2:18]).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:20]).float()
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 holding a little-endian uint32 -> [n, 32] uint8 with bit j at index j."""
    return _bits(qh).reshape(qh.shape[0], 32) << 4


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 6:22]) | _q5_high(blocks[:, 2:6])
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:24]) | _q5_high(blocks[:, 4:8])
    return d * q.float() + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = blocks[:, 2:34].view(torch.int8)
    return q.float() * d


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 12] packed 6-bit scales and mins (Q4_K, Q5_K) -> two [n, 8] float32.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; the top 2 bits of bytes
    0-3 / 4-7 are the high bits of scales / mins 4-7, whose low 4 bits are in bytes 8-11.
    """
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] uint8 -> [n, 8, 32]: chunk i of 32 bytes gives sub-blocks 2i (low), 2i+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _k_apply(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Scale [n, 8, 32] sub-block values by the Q4_K/Q5_K header: (d*sc) * q - dmin*m."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc).unsqueeze(-1)
    ml = (dmin * mn).unsqueeze(-1)
    return (dl * q.float() - ml).reshape(-1, _QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_apply(blocks, _k_nibbles(blocks[:, 16:144]))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # qh[l] bit j is the 5th bit of value l of sub-block j.
    qh = _bits(blocks[:, 16:48]).transpose(1, 2)  # [n, 8, 32]
    return _k_apply(blocks, _k_nibbles(blocks[:, 48:176]) | (qh << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    # Two halves of 128 values. In half h, chunk c (32 values) takes the low (c < 2) or high
    # nibble of ql[64h + 32(c % 2) + l] and bits 2c..2c+1 of qh[32h + l].
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device)
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts.reshape(1, 1, 4, 1)) & 0x03
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    return ((d * scales).unsqueeze(-1) * q.float()).reshape(n, _QK_K)


_BLOCK_DECODERS: dict[gguf.GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _Q.Q4_0: _q4_0,
    _Q.Q4_1: _q4_1,
    _Q.Q5_0: _q5_0,
    _Q.Q5_1: _q5_1,
    _Q.Q8_0: _q8_0,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
}

_FLOAT_TYPES = {_Q.F32: torch.float32, _Q.F16: torch.float16, _Q.BF16: torch.bfloat16}

_REFERENCE_TYPES = frozenset({_Q.Q2_K, _Q.Q3_K, _Q.IQ4_NL, _Q.IQ4_XS})
"""Types read with gguf's own numpy decoders (the reference the vectorized ones are checked
against): correct, slower, on the CPU; found in some Q2_K/Q3_K/IQ4 mixes."""

SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    [*_FLOAT_TYPES, *_BLOCK_DECODERS, *_REFERENCE_TYPES])


def _supported_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))


def _check_type(qtype: gguf.GGMLQuantizationType | int) -> gguf.GGMLQuantizationType:
    try:
        qt = _Q(int(qtype))
    except ValueError:
        qt = None
    if qt is None or qt not in SUPPORTED_TYPES:
        name = qt.name if qt is not None else f"unknown ggml type id {int(qtype)}"
        raise UnsupportedQuantizationError(
            f"tensor type {name} is not supported; supported types are {_supported_names()}. "
            "Re-quantize the model to one of them with llama.cpp's llama-quantize "
            "(e.g. `llama-quantize --allow-requantize in.gguf out.gguf Q4_K_M`)."
        )
    return qt


def row_bytes(qtype: gguf.GGMLQuantizationType | int, n_cols: int) -> int:
    """Bytes one row of `n_cols` values takes in `qtype`; `n_cols` must fill whole blocks."""
    qt = _check_type(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    if n_cols % block_size != 0:
        raise WeightLoadError(
            f"a {qt.name} row must hold a multiple of {block_size} values, got {n_cols}; "
            "the tensor's shape does not fit its type, so the model file is likely corrupt"
        )
    return n_cols // block_size * type_size


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    """Flatten any tensor to its raw bytes as a 1-D uint8 tensor (a view when possible)."""
    if data.dtype != torch.uint8:
        data = data.contiguous().reshape(-1).view(torch.uint8)
    return data.reshape(-1)


def dequantize(
    data: torch.Tensor, qtype: gguf.GGMLQuantizationType | int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode the raw GGUF bytes of one tensor into float32 of `shape` on `data`'s device.

    `data` holds the tensor's bytes as stored in the file (uint8 of any shape, or for F32/F16/BF16
    a tensor of that dtype). `shape` is in torch order (reversed ggml `ne`); its last dim is the
    contiguous one. For F32 input the result may share memory with `data`.
    """
    qt = _check_type(qtype)
    shape = tuple(int(s) for s in shape)
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    n_cols = shape[-1] if shape else 1
    expected = n_rows * row_bytes(qt, n_cols)
    raw = _as_bytes(data)
    if raw.numel() != expected:
        raise WeightLoadError(
            f"{qt.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}; "
            "the model file is truncated or corrupt, or the data was sliced wrongly"
        )

    if qt in _FLOAT_TYPES:
        dtype = _FLOAT_TYPES[qt]
        if raw.storage_offset() % dtype.itemsize != 0:
            raw = raw.clone()  # view(dtype) needs an aligned start
        return raw.view(dtype).to(torch.float32).reshape(shape)

    if qt in _REFERENCE_TYPES:
        _log_reference_decoder(qt)
        values = gguf.quants.dequantize(raw.cpu().numpy(), qt).astype("float32", copy=False)
        return torch.from_numpy(values).to(raw.device).reshape(shape)
    _, type_size = gguf.GGML_QUANT_SIZES[qt]
    blocks = raw.reshape(-1, type_size)
    return _BLOCK_DECODERS[qt](blocks).reshape(shape)


@functools.cache
def _log_reference_decoder(qt: gguf.GGMLQuantizationType) -> None:
    log.warning("%s tensors are dequantized to float at load with gguf's reference decoder "
                "(slower to load, and multiplied as float: no kernel keeps %s quantized)",
                qt.name, qt.name)
