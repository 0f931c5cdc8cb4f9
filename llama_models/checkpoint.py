"""Reading model files into a `Checkpoint`: metadata plus raw tensors, nothing computed yet.

Two formats: a GGUF file (read with the `gguf` package; tensors stay as the file's bytes, memory
mapped) and a Hugging Face directory (config.json + *.safetensors: checked by `safetensors`, and
memory mapped as numpy arrays, bfloat16 kept as its 16-bit patterns). Neither imports torch.
Every way a file can be wrong becomes a `WeightLoadError` that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llama_engine.errors import (
    ConfigError,
    LlamaError,
    ModelNotFoundError,
    WeightLoadError,
    file_read_errors,
)
from llama_models.gguf_file import MAX_TENSORS, read_gguf_file

__all__ = ["BF16", "F16", "F32", "FLOAT_NAMES", "Checkpoint", "RawTensor", "check_float",
           "check_int", "check_tensors", "dense_float32", "float32", "read_checkpoint",
           "read_gguf", "read_hf_dir", "release_pages", "rename_hf_tensors", "typed_errors"]

GGUF_MAGIC = b"GGUF"

# Bounds on a model's configuration, checked before anything is sized from it: generous for real
# models (Llama 3 405B: 126 layers, 128 heads, dim 16384, ffn 53248; Gemma 3: 262144 tokens).
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_DIM = 1 << 17
"""embedding width, and head width"""
MAX_FFN_DIM = 1 << 20
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 24
MAX_CONFIG_BYTES = 16 << 20
"""config.json (real ones are a few KB)"""


@dataclass(frozen=True, slots=True)
class RawTensor:
    """One tensor as stored: `qtype` is a `gguf.GGMLQuantizationType` value, `shape` is in
    row-major order (rows, cols), `data` is a numpy array over the stored bytes: uint8, one row
    per block row, for a quantized type; float32 (F32), float16 (F16), or uint16 bit patterns
    (BF16) for a float one (every HF safetensors tensor is one of these three)."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    data: Any

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(kw_only=True)
class Checkpoint:
    path: Path
    format: Literal["gguf", "hf"]
    architecture: str
    metadata: Mapping[str, Any]
    """GGUF key/values, or the HF config.json."""
    tensors: dict[str, RawTensor]
    hf_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    def storage_type(self, t: RawTensor) -> str:
        """How `t` is stored: a GGUF type name (Q4_1, F32, ...) or, for an HF file, the float
        dtype (bfloat16)."""
        if self.format == "hf":
            return HF_TYPE_NAMES[t.qtype]
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(t.qtype).name

    def quant_types(self) -> dict[str, int]:
        """Storage type -> number of tensors stored that way."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            name = self.storage_type(t)
            counts[name] = counts.get(name, 0) + 1
        return counts


F32, F16, BF16, F64 = 0, 1, 30, 28
"""The float types' gguf.GGMLQuantizationType values."""
FLOAT_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}
_SAFETENSORS_TYPES: dict[str, tuple[int, type[np.generic], str]] = {
    "F32": (F32, np.float32, "float32"), "F16": (F16, np.float16, "float16"),
    "BF16": (BF16, np.uint16, "bfloat16"), "F64": (F64, np.float64, "float64"),
    "I8": (24, np.int8, "int8"), "I16": (25, np.int16, "int16"), "I32": (26, np.int32, "int32"),
    "I64": (27, np.int64, "int64")}
"""safetensors dtype -> (gguf.GGMLQuantizationType, how numpy holds it: bfloat16 as its bit
patterns, its name). Integer tensors are buffers like BERT's position_ids, never weights."""
_STORAGE = {qtype: storage for qtype, storage, _ in _SAFETENSORS_TYPES.values()}
HF_TYPE_NAMES = {qtype: name for qtype, _, name in _SAFETENSORS_TYPES.values()}


def float32(t: RawTensor) -> np.ndarray:
    """A float tensor (F32, F16 or BF16) as a float32 array of its shape (a copy, except for
    F32)."""
    if t.qtype not in (*FLOAT_NAMES, F64):
        raise ValueError(f"{t.name} is quantized or an integer tensor, not a float one")
    data = np.asarray(t.data)
    if data.dtype == np.uint8:  # a GGUF tensor's raw bytes
        data = data.view(_STORAGE[t.qtype])
    if t.qtype == BF16:  # the high half of a float32's bits
        return (data.astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    return data.astype(np.float32, copy=False).reshape(t.shape)


def check_int(value: Any, key: str, source: str, *, lo: int = 1, hi: int) -> int:
    """`value` of config key `key` as an int in [lo, hi], or a ConfigError naming key and file."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or (not isinstance(value, numbers.Integral) and not float(value).is_integer())):
        raise ConfigError(
            f"{source}: {key} should be an integer, got {value!r} ({type(value).__name__}); the "
            "file is corrupt or was edited by hand, restore it")
    v = int(value)
    if not lo <= v <= hi:
        raise ConfigError(
            f"{source}: {key} is {v}, outside the range [{lo}, {hi}] llama-engine accepts; the "
            "file is corrupt or was edited by hand, restore it")
    return v


def check_float(value: Any, key: str, source: str, *, lo: float = 0.0,
                hi: float = math.inf) -> float:
    """`value` of config key `key` as a finite float with lo < value <= hi, or a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{source}: {key} should be a number, got {value!r} ({type(value).__name__}); the "
            "file is corrupt or was edited by hand, restore it")
    v = float(value)
    if not (math.isfinite(v) and lo < v <= hi):
        raise ConfigError(
            f"{source}: {key} is {v}, not a finite number in ({lo}, {hi}]; the file is corrupt "
            "or was edited by hand, restore it")
    return v


def typed_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Every failure inside becomes a `LlamaError` about the model file `what`."""
    return file_read_errors(
        what, fix="the file is corrupt or not a model llama-engine can read, restore it or use "
        "another")


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a GGUF file or an HF model directory; every failure is a `LlamaError`."""
    with typed_errors(f"model {str(path)!r}"):
        return _read_checkpoint(path)


def _read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(
            f"model path {str(p)!r} does not exist; give the path of a .gguf file or of a "
            "Hugging Face model directory, or a registered model name "
            "(llama-engine info --models lists them)")
    if p.is_dir():
        return read_hf_dir(p)
    return read_gguf(p)


def rename_hf_tensors(ckpt: Checkpoint, weight_map: Mapping[str, str], ignored: re.Pattern[str],
                      family: str) -> dict[str, RawTensor]:
    """An HF checkpoint's tensors under GGUF names: each name matches one `weight_map` pattern
    (regex -> replacement) or `ignored`; anything else is refused."""
    named: dict[str, RawTensor] = {}
    for name, t in ckpt.tensors.items():
        if ignored.fullmatch(name):
            continue
        new = next((re.sub(p, repl, name) for p, repl in weight_map.items()
                    if re.fullmatch(p, name)), None)
        if new is None:
            raise WeightLoadError(
                f"{ckpt.path} holds an unexpected tensor {name!r} for {family}; is the "
                "model_type in config.json right?")
        named[new] = RawTensor(new, t.qtype, t.shape, t.data)
    return named


def check_tensors(path: Path, named: Mapping[str, RawTensor],
                  expected: Mapping[str, tuple[int, ...]], family: str, *,
                  optional: frozenset[str] = frozenset(), shapes_from: str = "config.json",
                  order: Any = None) -> None:
    """Every expected tensor present with its shape, and nothing else but `optional` ones."""
    missing = sorted(set(expected) - set(named), key=order)
    if missing:
        raise WeightLoadError(
            f"{path} is missing {len(missing)} tensor(s), e.g. {missing[:3]}; the file is "
            f"incomplete or not {family}")
    extra = sorted(set(named) - set(expected) - optional, key=order)
    if extra:
        raise WeightLoadError(f"{path} has unexpected tensors {extra[:3]}")
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise WeightLoadError(
                f"{path}: tensor {name} has shape {named[name].shape}, expected {shape} "
                f"from {shapes_from}; the file is inconsistent")


def dense_float32(raw: RawTensor) -> np.ndarray:
    """Any tensor as a float32 copy of its values (a backend must not borrow the file's
    mapping): float types widened, quantized ones by gguf's numpy dequantizers."""
    from gguf.quants import dequantize

    if raw.qtype in FLOAT_NAMES:
        return np.array(float32(raw), dtype=np.float32, copy=True, order="C")
    data = np.asarray(raw.data)
    return np.ascontiguousarray(dequantize(data, raw.qtype).reshape(raw.shape), np.float32)


def release_pages(data: Any) -> None:
    """Drop a memory-mapped tensor's pages from this process's resident set once a backend has
    made its own copy (they are re-read from the page cache if touched again). Without this, a
    loaded model counts twice in RSS: the file's pages and the backend's weights."""
    import mmap

    if not isinstance(data, np.ndarray) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    root = data
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.memmap):
        return  # not file-backed
    mm: mmap.mmap = root.base
    # np.memmap maps from an allocation-granularity boundary at or before its offset
    mm_start = root.__array_interface__["data"][0] - root.offset % mmap.ALLOCATIONGRANULARITY
    start = data.__array_interface__["data"][0] - mm_start
    page = mmap.PAGESIZE
    lo = (start + page - 1) // page * page  # only whole pages inside the tensor
    hi = (start + data.nbytes) // page * page
    if hi > lo:
        with contextlib.suppress(OSError, ValueError):  # advice only: nothing depends on it
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def read_gguf(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise WeightLoadError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
            "model file, or convert the model with llama.cpp's convert_hf_to_gguf.py")
    metadata, infos = read_gguf_file(path)  # raises WeightLoadError on anything malformed
    tensors = {t.name: RawTensor(t.name, t.qtype, t.shape, t.data) for t in infos}
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise WeightLoadError(
            f"{path} has no general.architecture key; it is not a model GGUF llama-engine can run")
    return Checkpoint(path=path, format="gguf", architecture=arch, metadata=metadata,
                      tensors=tensors)


def read_hf_dir(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(
            f"{path} is a directory without config.json; give a Hugging Face model directory "
            "(config.json + *.safetensors) or a .gguf file")
    config = read_config_json(cfg_path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{path} has no *.safetensors files; llama-engine reads safetensors weights only "
            "(re-save .bin checkpoints with transformers' save_pretrained())")
    tensors: dict[str, RawTensor] = {}
    # a multimodal checkpoint (a text_config beside a vision_config): its language model is
    # what runs here, so the vision tower and projector are not read at all
    skip = _VISION_TENSORS if {"text_config", "vision_config"} <= config.keys() else None
    for fp in files:
        try:
            with safe_open(fp, framework="np") as sf:  # checks the header and the offsets
                names = list(sf.keys())
                if skip is not None:
                    names = [n for n in names if not skip.match(n)]
                if len(tensors) + len(names) > MAX_TENSORS:
                    raise WeightLoadError(
                        f"{path} holds more than {MAX_TENSORS} tensors, more than llama-engine "
                        "accepts; is this a model directory?")
            tensors.update(_map_safetensors(fp, names))
        except LlamaError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightLoadError(f"{fp} is corrupt or truncated ({e}); copy it again") from e
    archs = config.get("architectures")
    first = archs[0] if isinstance(archs, list) and archs else None
    arch = config.get("model_type") or first
    if not isinstance(arch, str):
        raise WeightLoadError(f"{cfg_path} has no model_type; cannot tell the architecture")
    return Checkpoint(path=path, format="hf", architecture=arch, metadata=config,
                      tensors=tensors, hf_dir=path)


def _map_safetensors(fp: Path, names: list[str]) -> dict[str, RawTensor]:
    """`names` of a safetensors file (already checked by `safetensors`) as arrays over a read-only
    memory map of it. The format: an 8-byte little-endian header size, a JSON header naming each
    tensor's dtype, shape and byte range, then the bytes. numpy has no bfloat16, which is why
    this maps the file itself rather than asking `safetensors` for numpy arrays."""
    with open(fp, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    if not names:
        return {}
    mapped = np.memmap(fp, dtype=np.uint8, mode="r")
    base = 8 + size
    out: dict[str, RawTensor] = {}
    for name in names:
        info = header[name]
        kind = _SAFETENSORS_TYPES.get(info["dtype"])
        if kind is None:
            raise WeightLoadError(
                f"{fp}: tensor {name} is {info['dtype']}; llama-engine reads float32, float16 "
                "and bfloat16 checkpoints (re-save it in one of those)")
        qtype, storage, _ = kind
        start, end = (base + int(o) for o in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        data = mapped[start:end].view(storage).reshape(shape)
        out[name] = RawTensor(name, qtype, shape, data)
    return out


_VISION_TENSORS = re.compile(r"(model\.)?(vision_tower|vision_model|multi_modal_projector)\.")


def read_config_json(path: Path) -> dict[str, Any]:
    """An HF config.json as a dict: size-bounded, valid JSON, an object."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path} is {size} bytes, more than the {MAX_CONFIG_BYTES} a config.json may "
                "have; restore the file")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightLoadError(f"{path} is not valid JSON ({e}); fix or replace it") from e
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path} should hold a JSON object, got a {type(config).__name__}; fix or replace it")
    return config
