"""Reading model files into a `Checkpoint`: metadata plus raw tensors, nothing computed yet.

Two formats: a GGUF file (read with the `gguf` package; tensors stay as the file's bytes, memory
mapped) and a Hugging Face directory (config.json + *.safetensors, read with `safetensors`).
Every way a file can be wrong becomes a `WeightLoadError` that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llama_engine.errors import ModelNotFoundError, WeightLoadError
from llama_models.gguf_file import read_gguf_file

__all__ = ["Checkpoint", "RawTensor", "check_tensors", "read_checkpoint", "read_gguf",
           "read_hf_dir", "release_pages", "rename_hf_tensors"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class RawTensor:
    """One tensor as stored: `qtype` is a `gguf.GGMLQuantizationType` value (F32 for HF float
    tensors), `shape` is in row-major order (rows, cols), `data` is the stored bytes (uint8,
    one row per block row) or, for HF files, a torch tensor of any float dtype."""

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
        """How `t` is stored: a GGUF type name (Q4_1, F32, ...) or a torch dtype (bfloat16)."""
        if self.format == "hf":
            return str(t.data.dtype).removeprefix("torch.")
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(t.qtype).name

    def quant_types(self) -> dict[str, int]:
        """Storage type -> number of tensors stored that way."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            name = self.storage_type(t)
            counts[name] = counts.get(name, 0) + 1
        return counts


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a GGUF file or an HF model directory."""
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
    try:
        metadata, infos = read_gguf_file(path)
    except (ValueError, IndexError, OSError, KeyError, struct.error) as e:
        raise WeightLoadError(
            f"{path} is a corrupt or truncated GGUF file ({e}); download or copy it again") from e
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
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{cfg_path} is not valid JSON ({e}); fix or replace it") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{path} has no *.safetensors files; llama-engine reads safetensors weights only "
            "(re-save .bin checkpoints with transformers' save_pretrained())")
    tensors: dict[str, RawTensor] = {}
    for fp in files:
        try:
            with safe_open(fp, framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    t = sf.get_tensor(name)
                    tensors[name] = RawTensor(name, 0, tuple(t.shape), t)
        except (SafetensorError, OSError) as e:
            raise WeightLoadError(f"{fp} is corrupt or truncated ({e}); copy it again") from e
    archs = config.get("architectures") or []
    arch = config.get("model_type") or (archs[0] if archs else None)
    if not isinstance(arch, str):
        raise WeightLoadError(f"{cfg_path} has no model_type; cannot tell the architecture")
    return Checkpoint(path=path, format="hf", architecture=arch, metadata=config,
                      tensors=tensors, hf_dir=path)
