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

__all__ = ["GGUFTensor", "read_gguf_file"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {0: np.float32, 1: np.float16}  # GGML F32, F16: typed arrays, as gguf-py


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
    """Little-endian reads from the map; running past its end raises ValueError."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"the file ends inside a header field at byte {self.pos}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise ValueError("an array runs past the end of the file")
                out = np.frombuffer(self.buf[self.pos:end], dtype=dt).tolist()
                self.pos = end
                return out
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.take(_SCALARS[vtype])


def read_gguf_file(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF v2/v3 little-endian file. Raises ValueError on a malformed
    or truncated file."""
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
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:
            raise ValueError(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if name in names or not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} is listed twice or has {n_dims} dimensions")
        names.add(name)
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align % 8:
        raise ValueError(f"general.alignment is {align!r}, not a positive multiple of 8")
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
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
