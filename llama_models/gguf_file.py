"""A GGUF file's metadata and tensor table, read straight from a memory map.

gguf-py's `GGUFReader` builds a numpy object per metadata item, string and array part: for a
49152-token vocabulary that is ~160 MB of transient heap, more than the quantized weights of a
135M model. Here the key/values become plain Python values (what `ReaderField.contents()` gives)
and tensors numpy views of the mapped file in gguf-py's layout (quantized types as uint8
[..., bytes per row], float types typed); gguf-py still names the types and their block sizes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_engine.errors import LlamaError, WeightLoadError

__all__ = ["GGUFTensor", "read_gguf_file"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {0: np.float32, 1: np.float16}  # GGML F32, F16: typed arrays, as gguf-py

# Bounds checked before anything is allocated. Real models sit far below each (a 262k-token
# vocabulary is one 262144-entry array; Llama 3 405B has 1138 tensors and ~40 keys), and every
# count is also checked against the bytes the file has left, so a small file cannot ask for more.
MAX_KV = 1 << 16
"""metadata keys"""
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16
"""a key or tensor name (the GGUF spec caps keys at 65535 bytes)"""
MAX_STRING_BYTES = 1 << 26
"""one string value (64 MiB; chat templates are a few KB)"""
MAX_ARRAY_LEN = 1 << 22
"""entries in one metadata array (4M; vocabularies and merges are at most ~1M)"""
MAX_ARRAY_DEPTH = 3
"""arrays of arrays, nested at most this deep (real files nest none)"""
MAX_ALIGNMENT = 1 << 20
# the smallest encodings: a key/value is a key length, a type and a 1-byte value; a tensor info a
# name length, n_dims, one dimension, a type and an offset; an array a type and a count.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_ARRAY_BYTES = 4 + 8
_STRING_HEADER_BYTES = 8


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]
    """numpy order (GGUF lists dimensions fastest first)."""
    offset: int
    n_bytes: int
    data: np.ndarray


class _Cursor:
    """Little-endian reads from the map; running past its end, or past a bound, raises
    ValueError."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def count(self, n: int, what: str, *, limit: int, min_bytes: int) -> int:
        """`n` items of at least `min_bytes` each, checked against `limit` and the bytes left."""
        if n > limit:
            raise ValueError(f"{what} is {n}, more than the {limit} llama-engine accepts")
        if n * min_bytes > self.left:
            raise ValueError(f"{what} is {n}, which needs at least {n * min_bytes} bytes but "
                             f"only {self.left} are left in the file at byte {self.pos}")
        return n

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"the file ends inside a header field at byte {self.pos}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        n = self.take("<Q")
        if n > limit:
            raise ValueError(f"a string at byte {self.pos - 8} is {n} bytes long, more than the "
                             f"{limit} llama-engine accepts")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"metadata arrays are nested more than {MAX_ARRAY_DEPTH} deep "
                                 f"at byte {self.pos}")
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                self.count(count, "a string array's length", limit=MAX_ARRAY_LEN,
                           min_bytes=_STRING_HEADER_BYTES)
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                self.count(count, "an array's length", limit=MAX_ARRAY_LEN,
                           min_bytes=dt.itemsize)
                end = self.pos + count * dt.itemsize
                out = np.frombuffer(self.buf[self.pos:end], dtype=dt).tolist()
                self.pos = end
                return out
            if etype != _ARRAY:
                raise ValueError(f"unknown metadata array element type {etype}")
            self.count(count, "an array of arrays' length", limit=MAX_ARRAY_LEN,
                       min_bytes=_MIN_ARRAY_BYTES)
            return [self.value(etype, depth + 1) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.take(_SCALARS[vtype])


def read_gguf_file(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF v2/v3 little-endian file. Every way the file can be wrong
    (malformed, truncated, a count past the bounds above or past the file's size) raises a
    `WeightLoadError` naming the file, with the underlying error as its cause."""
    try:
        return _read(path)
    except LlamaError:
        raise
    except Exception as e:  # anything a malformed file provokes, typed here once
        detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise WeightLoadError(
            f"{path} is a corrupt or truncated GGUF file ({detail}); download or copy it "
            "again") from e


def _read(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    mm = np.memmap(path, mode="r", dtype=np.uint8)
    cur = _Cursor(memoryview(mm))
    if bytes(mm[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian, or too old/new); "
                         "llama-engine reads versions 2 and 3")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    cur.count(n_kv, "the metadata key count", limit=MAX_KV, min_bytes=_MIN_KV_BYTES)
    cur.count(n_tensors, "the tensor count", limit=MAX_TENSORS, min_bytes=_MIN_TENSOR_INFO_BYTES)
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise ValueError(f"{n_kv} metadata keys and {n_tensors} tensors need more than the "
                         f"{cur.left} bytes left in the file")
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string(MAX_KEY_BYTES)
        if key in metadata:
            raise ValueError(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.take("<I"))
    cur.count(n_tensors, "the tensor count", limit=MAX_TENSORS, min_bytes=_MIN_TENSOR_INFO_BYTES)
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string(MAX_KEY_BYTES)
        n_dims = cur.take("<I")
        if name in names or not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} is listed twice or has {n_dims} dimensions")
        names.add(name)
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = metadata.get("general.alignment", 32)
    if (not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= MAX_ALIGNMENT
            or align % 8):
        raise ValueError(f"general.alignment is {align!r}, not a positive multiple of 8 up to "
                         f"{MAX_ALIGNMENT}")
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has type id {qtype}, which the installed gguf "
                             "package does not know (a corrupt file, or one newer than gguf: "
                             "pip install -U gguf)") from None
        n_el = math.prod(dims)
        if dims[0] % block or offset % align:
            raise ValueError(f"tensor {name}: rows of {dims[0]} are not whole blocks of "
                             f"{block}, or its offset {offset} is not aligned to {align}")
        n_bytes = n_el // block * type_size
        at = start + offset
        if at + n_bytes > mm.shape[0]:
            raise ValueError(f"tensor {name!r} needs bytes up to {at + n_bytes} but the file "
                             f"has {mm.shape[0]}")
        shape = tuple(int(d) for d in reversed(dims))
        raw = mm[at:at + n_bytes]
        if qtype in _FLOAT_TYPES:
            data = raw.view(_FLOAT_TYPES[qtype]).reshape(shape)
        else:  # quantized (and bf16): bytes per row, as gguf-py
            data = raw.reshape(*shape[:-1], dims[0] // block * type_size)
        tensors.append(GGUFTensor(name, qtype, shape, at, n_bytes, data))
    return metadata, tensors
