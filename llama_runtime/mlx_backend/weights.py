"""GGUF weights in MLX's own quantized layout, repacked at load without changing a value.

MLX's affine quantization keeps, per group of `group_size` elements of a row, a float scale and
bias, and the element codes as unsigned integers of `bits` bits packed little-endian into
uint32 words (element j of a row at bits [bits*j, bits*j + bits) of the row's bit stream), so a
weight is `scale * code + bias`. Every GGUF type whose blocks are groups of 32 elements with one
scale and one offset maps onto that exactly (group size 32), the signed types with a bias that
shifts their codes to unsigned ones:

| GGUF   | value                | bits | scale    | bias      |
|--------|----------------------|------|----------|-----------|
| Q4_0   | (q - 8) d            | 4    | d        | -8 d      |
| Q4_1   | q d + m              | 4    | d        | m         |
| Q5_0   | (q - 16) d           | 5    | d        | -16 d     |
| Q5_1   | q d + m              | 5    | d        | m         |
| Q8_0   | q d, q signed        | 8    | d        | -128 d    |
| Q4_K   | q d sc_j - dmin m_j  | 4    | d sc_j   | -dmin m_j |
| Q5_K   | q d sc_j - dmin m_j  | 5    | d sc_j   | -dmin m_j |

Scales and biases are kept in the compute dtype: in float32 (the CPU's default) they hold these
products exactly; in float16 (Metal's default) or bfloat16 a K-quant's `d sc` (and, in
bfloat16, `d` itself) rounds to it, as the activations do. Q6_K's scales cover 16 elements,
finer than any MLX group, so it is dequantized to the compute dtype, as are other types, with a
log line naming them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q

from llama_models.checkpoint import BF16, FLOAT_NAMES, RawTensor, dense_float32, float32

__all__ = ["DEQUANTIZED", "GROUP", "KEPT_QUANTIZED", "KEPT_TYPES", "QuantWeight", "float_array",
           "pack_codes", "prepare_weight", "repack", "weight_path"]

GROUP = 32
"""Elements per scale and bias."""

KEPT_QUANTIZED = "kept quantized (MLX affine, group 32)"
DEQUANTIZED = "dequantized to the compute dtype"


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A [N, K] weight in MLX's affine layout: packed codes uint32 [N, K * bits / 32], scales
    and biases [N, K / 32] in the compute dtype."""

    w: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    shape: tuple[int, int]

    def matmul(self, x: mx.array) -> mx.array:
        """x @ W.T."""
        if x.size == 0:  # a step whose rows want no logits (MLX's CPU kernel divides by rows)
            return mx.zeros((*x.shape[:-1], self.shape[0]), dtype=x.dtype)
        return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows `ids` dequantized: [len(ids), K]."""
        return mx.dequantize(self.w[ids], self.scales[ids], self.biases[ids],
                             group_size=GROUP, bits=self.bits)

    @property
    def arrays(self) -> list[mx.array]:
        return [self.w, self.scales, self.biases]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 little-endian half floats -> [n] float32."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: the low nibbles are elements 0-15, the high 16-31."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bit j of it at element j, shifted to
    bit 4."""
    word = np.ascontiguousarray(qh).view("<u4")  # [n, 1]
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


# A decoder takes a type's blocks [n, block bytes] and returns codes [n * groups, 32] uint8 and
# scales, biases [n * groups] float32 (groups: 32-element groups a block holds).
Blocks = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6]), d, -16 * d


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, 0:2])
    codes = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: each super-block's 8 scales and mins, [n, 8] float32, from their 6-bit
    packing in bytes 4-15 (ggml's get_scale_min_k4), already multiplied by d and dmin."""
    q = b[:, 4:16].astype(np.uint8)
    sc = np.empty((len(b), 8), dtype=np.uint8)
    mn = np.empty((len(b), 8), dtype=np.uint8)
    sc[:, :4], mn[:, :4] = q[:, 0:4] & 63, q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d[:, None] * sc, -(dmin[:, None] * mn)


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 8, 32] codes: chunk c of 32 bytes holds group 2c in its low nibbles
    and group 2c + 1 in its high ones."""
    chunks = qs.reshape(-1, 4, 32)
    return np.stack((chunks & 0x0F, chunks >> 4), axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, biases = _k_scales(b)
    return _k_codes(b[:, 16:144]).reshape(-1, 32), scales.ravel(), biases.ravel()


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, biases = _k_scales(b)
    codes = _k_codes(b[:, 48:176])  # [n, 8, 32]
    qh = b[:, 16:48]  # bit g of byte e: group g's element e
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    return (codes | high).reshape(-1, 32), scales.ravel(), biases.ravel()


_TYPES: dict[int, tuple[int, int, Blocks]] = {
    Q.Q4_0: (4, 18, _q4_0), Q.Q4_1: (4, 20, _q4_1), Q.Q5_0: (5, 22, _q5_0),
    Q.Q5_1: (5, 24, _q5_1), Q.Q8_0: (8, 34, _q8_0), Q.Q4_K: (4, 144, _q4_k),
    Q.Q5_K: (5, 176, _q5_k),
}
"""Each kept type: (bits, bytes a block, its decoder)."""

KEPT_TYPES = tuple(Q(t).name for t in _TYPES)
"""The GGUF types kept quantized (the capability matrix's quant_native)."""


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes of `bits` bits -> uint32 [N, K * bits / 32], little-endian bit stream."""
    n, k = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
    eights = codes.reshape(n, k // 8, 8).astype(np.uint64)  # 8 codes: `bits` whole bytes
    word = np.zeros((n, k // 8), dtype=np.uint64)
    for j in range(8):
        word |= eights[:, :, j] << np.uint64(bits * j)
    stream = word[..., None].view(np.uint8)[:, :, :bits]  # little-endian: the low bytes
    return np.ascontiguousarray(stream).reshape(n, -1).view(np.uint32)


def weight_path(raw: RawTensor) -> str:
    """How the MLX backend holds `raw`."""
    if raw.qtype in _TYPES and len(raw.shape) == 2 and isinstance(raw.data, np.ndarray):
        return KEPT_QUANTIZED
    return DEQUANTIZED


def repack(raw: RawTensor, dtype: mx.Dtype) -> QuantWeight:
    """A kept type's GGUF bytes -> QuantWeight, exactly the stored values."""
    bits, block_bytes, decode = _TYPES[raw.qtype]
    n, k = raw.shape
    blocks = np.asarray(raw.data).reshape(-1, block_bytes)
    codes, scales, biases = decode(blocks)
    return QuantWeight(
        w=mx.array(pack_codes(codes.reshape(n, k), bits)),
        scales=mx.array(scales.reshape(n, k // GROUP)).astype(dtype),
        biases=mx.array(biases.reshape(n, k // GROUP)).astype(dtype),
        bits=bits, shape=(n, k))


def float_array(raw: RawTensor, dtype: mx.Dtype) -> mx.array:
    """A float tensor in `dtype` (bfloat16 from its bit patterns, without a float32 detour);
    other types dequantized by gguf's numpy dequantizers."""
    if raw.qtype == BF16:
        bits = np.array(np.asarray(raw.data).view(np.uint16), copy=True).reshape(raw.shape)
        return mx.array(bits).view(mx.bfloat16).astype(dtype)
    values = float32(raw) if raw.qtype in FLOAT_NAMES else dense_float32(raw)
    return mx.array(np.ascontiguousarray(values)).astype(dtype)


def prepare_weight(raw: RawTensor, dtype: mx.Dtype) -> Any:
    """`raw` as the MLX ops take it: a QuantWeight (kept types) or an array of `dtype`."""
    if weight_path(raw) == KEPT_QUANTIZED:
        return repack(raw, dtype)
    return float_array(raw, dtype)
