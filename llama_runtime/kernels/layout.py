"""The kernels' weight layout (csrc/qgemm.h), built with numpy alone: GGUF Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K and Q6_K bytes repacked into groups of 16 rows interleaved four elements at a
time, with no requantization (the same values). Both the torch backend (qweights.py) and the
torch-free native path use it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llama_models.checkpoint import RawTensor, release_pages

__all__ = ["GROUP", "KEPT_QUANTIZED", "KEPT_TYPES", "REPACKABLE", "RUN", "PackedWeight", "pack",
           "weight_path"]

# gguf.GGMLQuantizationType values
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
REPACKABLE = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K})
KEPT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""REPACKABLE's names (the capability matrix's quant_native)."""
_KINDS = {Q4_0: "q4", Q4_1: "q4", Q4_K: "q4", Q5_0: "q5", Q5_1: "q5", Q5_K: "q5", Q8_0: "q8",
          Q6_K: "q8"}
"""How each type is held: nibbles (q4), nibbles and fifth bits (q5), a byte an element (q8)."""
FIFTH_START = (0, 16, 4, 20, 8, 24, 12, 28)
"""The first element of a block each of q5's eight fifth-bit masks covers (csrc/qgemm.h)."""
GROUP = 16
"""Weight rows interleaved per group (csrc/qgemm.h)."""
RUN = 4
"""Consecutive elements of one row kept together (a VNNI lane's four bytes)."""


KEPT_QUANTIZED = "kept quantized (compiled kernel)"


def weight_path(raw: RawTensor, quantized: bool) -> str:
    """How a CPU backend holds `raw` when quantized weights are on (or off): GGUF bytes
    (a numpy array) of a repackable 2-D type stay quantized, the rest become float."""
    if (quantized and raw.qtype in REPACKABLE and len(raw.shape) == 2
            and isinstance(raw.data, np.ndarray)):
        return KEPT_QUANTIZED
    return "dequantized to the compute dtype"


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [N, K] weight in the kernels' layout: q4 (qs uint8 [G*16, K/2], d and m [G*16, K/32]),
    q5 (q4's arrays, and the fifth bits qh uint8 [G*16, K/8]) or q8 (qs int8 [G*16, K], d
    [G*16, K/32]; Q6_K's scales are one a 16 elements, [G*16, K/16]), each array holding its
    groups' bytes in the order csrc/qgemm.h gives; scales float16 where the file has them so
    (exact), float32 otherwise. Rows are zero-padded to a multiple of 16."""

    kind: str  # "q4", "q5" or "q8"
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray | None
    shape: tuple[int, int]
    qh: np.ndarray | None = None

    @property
    def per(self) -> int:
        """Elements a scale: 32, or 16 (Q6_K's)."""
        return self.shape[1] * self.d.shape[0] // self.d.size


def _f16(a: np.ndarray) -> np.ndarray:
    """The float16 in a trailing axis of two bytes, as float32."""
    return a.copy().view(np.float16)[..., 0].astype(np.float32)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K and Q5_K super-blocks [n, k/256, B] (d f16, dmin f16, 12 bytes of 6-bit scales and
    mins, ...) -> their per-32 scales d * sc and offsets -dmin * m [n, k/32], float32 (the
    products gguf's dequantization computes, exactly)."""
    from gguf.quants import Q4_K as GGUF_Q4_K

    n, nsb, _ = blocks.shape
    sc, mn = GGUF_Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    d_sub = (_f16(blocks[..., 0:2]).reshape(-1, 1) * sc.astype(np.float32)).reshape(n, nsb * 8)
    m_sub = -(_f16(blocks[..., 2:4]).reshape(-1, 1) * mn.astype(np.float32)).reshape(n, nsb * 8)
    return d_sub, m_sub


def _nibble_pairs(qs: np.ndarray, n: int, nsb: int) -> np.ndarray:
    """A K-quant's 128 bytes of nibbles a super-block -> [n, k/32, 32] values: each 32 bytes
    hold two 32-element sub-blocks, the first in the low nibbles."""
    q = qs.reshape(n, nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    return (q & 0x0F).reshape(n, nsb * 8, 32)


def _split_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [n, k/256, 144] (d, dmin, scales, 128 bytes of nibbles) -> per-32 d, m
    [n, k/32] and our nibble order [n, k/32, 16]."""
    n, nsb, _ = blocks.shape
    d_sub, m_sub = _k_scales(blocks)
    q = _nibble_pairs(blocks[..., 16:], n, nsb)
    return d_sub, m_sub, (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _split_q5_k(
        blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q5_K super-blocks [n, k/256, 176] (d, dmin, scales, 32 bytes of fifth bits, 128 bytes of
    nibbles; w = d * sc * q - dmin * m, q in [0, 31]) -> per-32 d, m [n, k/32], our nibble
    order [n, k/32, 16] and the fifth bits [n, k/32, 32]."""
    n, nsb, _ = blocks.shape
    d_sub, m_sub = _k_scales(blocks)
    low = _nibble_pairs(blocks[..., 48:], n, nsb)
    # sub-block s's fifth bits: bit s of the 32 bytes qh
    high = blocks[..., 16:48].reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
    high = (high & 1).reshape(n, nsb * 8, 32)
    return d_sub, m_sub, (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8), high


def _split_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K super-blocks [n, k/256, 210] (128 bytes of low nibbles, 64 of high bit pairs, 16
    int8 scales, d f16; w = d * sc * (q - 32)) -> per-16 scales d * sc [n, k/16] (float32,
    exact) and q - 32 as int8 [n, k/32, 32]."""
    n, nsb, _ = blocks.shape
    low = blocks[..., 0:128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    low = (low & 0x0F).reshape(n, nsb * 8, 32)
    high = blocks[..., 128:192].reshape(n, nsb, 2, 1, 32) >> np.array(
        [0, 2, 4, 6], np.uint8).reshape(4, 1)
    high = (high & 3).reshape(n, nsb * 8, 32)
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # [n, nsb, 16]
    d16 = (_f16(blocks[..., 208:210])[..., None] * sc).reshape(n, nsb * 16)
    return d16, ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


PACK_ROWS = 4096
"""Rows repacked at a time (a multiple of GROUP): the temporaries stay a few MB whatever the
tensor (Gemma 3's 262144-row embedding would otherwise double its size at load)."""


def pack(raw: RawTensor) -> PackedWeight:
    """GGUF bytes of a REPACKABLE type -> PackedWeight, exactly the stored values: Q5_0, Q5_1
    and Q5_K as nibbles and fifth bits (Q5_0 with the offset -16d), Q6_K's 6-bit values less 32
    as q8's int8; the K-quants' sub-block scales (and offsets) are the float32 products
    d * scale and -dmin * min that their dequantization computes. Works PACK_ROWS rows at a
    time and drops the file's pages of each slice once it is copied (release_pages)."""
    if raw.qtype not in REPACKABLE:
        raise ValueError(f"type {raw.qtype} cannot be repacked")
    n, k = raw.shape
    data = np.asarray(raw.data).reshape(n, -1)  # each row's blocks, as bytes
    # Q4_0's offset -8d and Q5_0's -16d stay float16 when every block's fits (exact), else all
    # of the tensor's scales go float32
    wide = raw.qtype in _ZERO_POINT and _offset_overflows(data.reshape(n, k // 32, -1),
                                                          _ZERO_POINT[raw.qtype])
    outs: list[np.ndarray | None] = []
    for r0 in range(0, n, PACK_ROWS):
        rows = data[r0:r0 + PACK_ROWS]
        qs, d, m, fifth = _blocks(rows, raw.qtype, k, wide)
        parts = [interleave(qs), interleave(d), None if m is None else interleave(m),
                 None if fifth is None else interleave_fifth(fifth)]
        if not outs:
            total = -(-n // GROUP) * GROUP
            outs = [None if a is None else np.empty((total, a.shape[1]), dtype=a.dtype)
                    for a in parts]
        for out, a in zip(outs, parts, strict=True):
            if out is not None and a is not None:
                out[r0:r0 + a.shape[0]] = a
        release_pages(rows)
    qs_all, d_all, m_all, qh_all = outs
    assert qs_all is not None and d_all is not None
    return PackedWeight(_KINDS[raw.qtype], qs_all, d_all, m_all, (n, k), qh_all)


_ZERO_POINT = {Q4_0: 8.0, Q5_0: 16.0}
"""The types whose values are stored less a zero point z: their offset is -z * d."""


def _offset_overflows(blocks: np.ndarray, zero_point: float) -> bool:
    d = _f16(blocks[..., 0:2])
    with np.errstate(over="ignore"):
        m = d * -zero_point
        return not np.array_equal(m.astype(np.float16).astype(np.float32), m)


def _blocks(rows: np.ndarray, qtype: int, k: int, wide: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Some rows' GGUF bytes -> qs [r, k/32, L], d [r, k/32, 1] (Q6_K: [r, k/16, 1]), m
    (offsets, where the type has them) like d, and q5's fifth bits [r, k/32, 32]; scales stay
    float16 where the file has them so (exact, and 4 bytes a block fewer to read)."""
    r, nb = rows.shape[0], k // 32
    m: np.ndarray | None = None
    fifth: np.ndarray | None = None
    if qtype == Q4_K:
        d, m, qs = _split_q4_k(rows.reshape(r, k // 256, -1))
        return qs, d[..., None], m[..., None], None
    if qtype == Q5_K:
        d, m, qs, fifth = _split_q5_k(rows.reshape(r, k // 256, -1))
        return qs, d[..., None], m[..., None], fifth
    if qtype == Q6_K:
        d, qs = _split_q6_k(rows.reshape(r, k // 256, 210))
        return qs, d[..., None], None, None
    data = rows.reshape(r, nb, -1)
    d = data[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == Q8_0:  # d f16, 32 x int8
        return data[..., 2:34].copy().view(np.int8), d[..., None], None, None
    if qtype in (Q4_1, Q5_1):  # d f16, m f16, (Q5_1: 32 fifth bits,) 16 bytes of nibbles
        m = data[..., 2:4].copy().view(np.float16)[..., 0]
    else:  # Q4_0, Q5_0: d f16, (Q5_0: 32 fifth bits,) 16 bytes of nibbles; w = d * (q - z)
        if wide:
            d = d.astype(np.float32)
        m = d * d.dtype.type(-_ZERO_POINT[qtype])
    at = 2 if qtype in (Q4_0, Q5_0) else 4  # the nibbles or the fifth bits
    if qtype in (Q5_0, Q5_1):
        high = data[..., at:at + 4].copy().view("<u4")  # [r, nb, 1]: bit j is element j's fifth
        fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        at += 4
    qs = data[..., at:at + 16]  # byte j: element j low, element j + 16 high (our order)
    return qs, d[..., None], m[..., None], fifth


def interleave_fifth(bits: np.ndarray) -> np.ndarray:
    """Fifth bits [r, nb, 32] (0 or 1) -> q5's masks as bytes [ceil(r / 16) * 16, nb * 4]: group
    g holds [nb, 8, 64 bits], mask v's bit 4 * row + i being the row's element
    FIFTH_START[v] + i (little-endian, as the kernels read a uint64)."""
    pad = -bits.shape[0] % GROUP
    if pad:
        bits = np.concatenate([bits, np.zeros((pad, *bits.shape[1:]), dtype=bits.dtype)])
    g, nb = bits.shape[0] // GROUP, bits.shape[1]
    order = (np.array(FIFTH_START).reshape(8, 1) + np.arange(RUN)).reshape(-1)
    b = bits[..., order].reshape(g, GROUP, nb, 8, RUN).transpose(0, 2, 3, 1, 4)
    packed = np.packbits(np.ascontiguousarray(b).reshape(g, nb, 8, GROUP * RUN), axis=-1,
                         bitorder="little")
    return packed.reshape(g * GROUP, nb * 4)


def interleave(a: np.ndarray) -> np.ndarray:
    """[r, nb, L] rows -> [ceil(r / 16) * 16, nb * L], group g holding [nb, L / 4, 16, 4]: per
    block, runs of four elements, each run for all 16 rows (scales: L = 1, [nb, 16]); rows
    zero-padded to a whole group."""
    pad = -a.shape[0] % GROUP
    if pad:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)])
    g, nb, per = a.shape[0] // GROUP, a.shape[1], a.shape[2]
    run = min(per, RUN)
    a = a.reshape(g, GROUP, nb, per // run, run).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(a).reshape(g * GROUP, -1)
