"""GGUF blocks and tensors of the quantized types for the dequantizer and kernel tests: gguf's own
quantizer where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), random bytes with finite float16
scales for the others (any byte pattern of a K-quant's or IQ4's values, sub-block scales and bit
planes is a valid block)."""

from __future__ import annotations

import gguf
import numpy as np

from llama_models.checkpoint import RawTensor

T = gguf.GGMLQuantizationType

F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}
"""Byte offsets of the float16 scale fields (d, m, dmin) in each block type's layout
(ggml-common.h)."""
QUANTIZABLE = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})
"""The types gguf's quantizer writes; the others' blocks are made at random."""


def random_blocks(qtype: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, with each f16 scale field finite, in [1e-3, 1e-1]."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-1, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def quantized(qtype: T, n: int, k: int, seed: int = 0) -> RawTensor:
    """A [n, k] tensor of `qtype` (k a multiple of the type's block, 256 for the K-quants)."""
    if qtype not in QUANTIZABLE:
        per, size = gguf.GGML_QUANT_SIZES[qtype]
        data = random_blocks(qtype, n * k // per, seed).reshape(n, k // per * size)
    else:
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
        data = gguf.quants.quantize(w, qtype)
    return RawTensor("w", int(qtype), (n, k), data)
