"""The kernels' weight layout (csrc/qgemm.h), built with numpy alone: GGUF Q4_0, Q4_1, Q5_0, Q8_0
and Q4_K bytes repacked into groups of 16 rows interleaved four elements at a time, with no
requantization (the same values). Both the torch backend (qweights.py) and the torch-free
native path use it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llama_models.checkpoint import RawTensor, release_pages

__all__ = ["GROUP", "KEPT_QUANTIZED", "REPACKABLE", "RUN", "PackedWeight", "pack", "weight_path"]

Q4_0, Q4_1, Q5_0, Q8_0, Q4_K = 2, 3, 6, 8, 12  # gguf.GGMLQuantizationType values
REPACKABLE = frozenset({Q4_0, Q4_1, Q5_0, Q8_0, Q4_K})
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
    """A [N, K] weight in the kernels' layout: q4 (qs uint8 [G*16, K/2], d and m [G*16, K/32])
    or q8 (qs int8 [G*16, K], d [G*16, K/32]), each array holding its groups' bytes in the
    order csrc/qgemm.h gives; scales float16 where the file has them so (exact), float32
    otherwise. Rows are zero-padded to a multiple of 16."""

    kind: str  # "q4" or "q8"
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray | None
    shape: tuple[int, int]


def _split_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [n, k/256, 144] (d f16, dmin f16, 12 bytes of 6-bit scales and mins,
    128 bytes of nibbles) -> per-32 d, m [n, k/32] and our nibble order [n, k/32, 16]."""
    from gguf.quants import Q4_K as GGUF_Q4_K

    n, nsb, _ = blocks.shape
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = GGUF_Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    d_sub = (d.reshape(-1, 1) * sc.astype(np.float32)).reshape(n, nsb * 8)
    m_sub = -(dmin.reshape(-1, 1) * mn.astype(np.float32)).reshape(n, nsb * 8)
    # 64 elements per 32 bytes: low nibbles are one sub-block, high nibbles the next
    q = blocks[..., 16:].reshape(n, nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    q = (q & 0x0F).reshape(n, nsb * 8, 32)
    return d_sub, m_sub, (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


PACK_ROWS = 4096
"""Rows repacked at a time (a multiple of GROUP): the temporaries stay a few MB whatever the
tensor (Gemma 3's 262144-row embedding would otherwise double its size at load)."""


def pack(raw: RawTensor) -> PackedWeight:
    """GGUF Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q4_K bytes -> PackedWeight, exactly the stored values
    (Q5_0's 5-bit values, less 16, as q8's int8; Q4_K's sub-block scales are the float32
    products d * scale and -dmin * min that its dequantization computes). Works PACK_ROWS rows
    at a time and drops the file's pages of each slice once it is copied (release_pages)."""
    if raw.qtype not in REPACKABLE:
        raise ValueError(f"type {raw.qtype} cannot be repacked")
    n, k = raw.shape
    data = np.asarray(raw.data).reshape(n, -1)  # each row's blocks, as bytes
    # Q4_0's offset -8d stays float16 when every block's fits (exact), else all go float32
    wide = raw.qtype == Q4_0 and _q4_0_offset_overflows(data.reshape(n, k // 32, 18))
    outs: list[np.ndarray] = []
    for r0 in range(0, n, PACK_ROWS):
        rows = data[r0:r0 + PACK_ROWS]
        parts = [interleave(a) for a in _blocks(rows, raw.qtype, k, wide) if a is not None]
        if not outs:
            total = -(-n // GROUP) * GROUP
            outs = [np.empty((total, a.shape[1]), dtype=a.dtype) for a in parts]
        for out, a in zip(outs, parts, strict=True):
            out[r0:r0 + a.shape[0]] = a
        release_pages(rows)
    return PackedWeight("q8" if len(outs) == 2 else "q4", outs[0], outs[1],
                        outs[2] if len(outs) == 3 else None, (n, k))


def _q4_0_offset_overflows(blocks: np.ndarray) -> bool:
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    with np.errstate(over="ignore"):
        return not np.array_equal((d * -8.0).astype(np.float16).astype(np.float32), d * -8.0)


def _blocks(rows: np.ndarray, qtype: int, k: int,
            wide: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Some rows' GGUF bytes -> qs [r, k/32, L], d [r, k/32, 1] and m (q4 only) like d; scales
    stay float16 where the file has them so (exact, and 4 bytes a block fewer to read)."""
    r, nb = rows.shape[0], k // 32
    m: np.ndarray | None = None
    if qtype == Q4_K:
        d, m, qs = _split_q4_k(rows.reshape(r, k // 256, 144))
        return qs, d[..., None], m[..., None]
    data = rows.reshape(r, nb, -1)
    d = data[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == Q8_0:  # d f16, 32 x int8
        qs = data[..., 2:34].copy().view(np.int8)
    elif qtype == Q5_0:  # d f16, 32 high bits, 16 bytes of nibbles; w = d * (q - 16)
        high = data[..., 2:6].copy().view("<u4")  # [r, nb, 1]: bit j is element j's fifth
        nibbles = data[..., 6:22]  # byte j: element j low, element j + 16 high
        low = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int16)
        fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
        qs = ((low | (fifth << 4)) - 16).astype(np.int8)
    elif qtype == Q4_1:  # d f16, m f16, 16 bytes of nibbles
        m = data[..., 2:4].copy().view(np.float16)[..., 0]
        qs = data[..., 4:20]
    else:  # Q4_0: d f16, 16 bytes of nibbles; w = d * (q - 8)
        if wide:
            d = d.astype(np.float32)
        m = d * d.dtype.type(-8.0)
        qs = data[..., 2:18]
    return qs, d[..., None], None if m is None else m[..., None]


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
