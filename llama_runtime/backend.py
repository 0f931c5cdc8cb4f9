"""The seam between the engine and a backend, and the registry of backends.

`Engine` (engine.py) owns everything a caller sees: sessions, the scheduler, streams, stats,
saved sessions, embeddings. It holds one `Backend`, which does three things: prepare a model's
weights and KV store (`prepare`), run one step over a batch of rows (`step`), and give the
mean-pooled hidden states of texts for decoder embeddings (`decoder_embed`).

Each backend registers itself once (`register`, from its package's __init__, which imports
nothing heavy): its name, a probe of what it can do on this machine (`info`), which devices a
run on it may ask for, the values of each option it accepts, and a factory. `create_engine` and
the CLI read backends, options and their values from here only.

Adding a backend: a package with a `Backend` (prepare / step / decoder_embed / release) and a
`register(BackendEntry(...))` in its __init__, listed in `_PACKAGES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llama_engine import InvalidParamsError

if TYPE_CHECKING:
    from tqdm import tqdm

    from llama_engine import ModelSpec
    from llama_models import ModelFiles
    from llama_runtime.backends import BackendInfo
    from llama_runtime.step import SeqStep

__all__ = ["Backend", "BackendEntry", "KVBudget", "KVStore", "Prepared", "check_options",
           "entries", "entry", "register"]


class KVStore(Protocol):
    """Where a backend keeps K/V, addressed by the flat slots llama_kv hands out."""

    @property
    def nbytes(self) -> int: ...

    @property
    def dtype_name(self) -> str: ...

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None: ...

    def read(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """K, V [layers, len(slots), kv_heads, head_dim] as float32 numpy arrays."""
        ...

    def write(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None: ...

    def kv_shape(self, n: int) -> tuple[int, ...]:
        """The shape read() returns for n slots: (layers, n, kv_heads, head_dim)."""
        ...


@dataclass(frozen=True, slots=True)
class KVBudget:
    """The engine's KV cache options, applied by the backend once it knows its KV dtype and
    the memory of its device."""

    memory: int | str
    """kv_memory: bytes, "2GiB", "30%" of what is available, or "auto"."""
    block_size: int

    def blocks(self, cfg: Any, dtype_bytes: int, available_bytes: int) -> int:
        from llama_runtime.loading import kv_blocks

        return kv_blocks(cfg, kv_memory=self.memory, block_size=self.block_size,
                         dtype_bytes=dtype_bytes, available_bytes=available_bytes)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A model a backend made ready, not yet current."""

    store: KVStore
    num_blocks: int
    weight_paths: dict[str, str]
    """How each weight tensor is held (kept quantized, or dequantized to a dtype)."""
    device: str
    dtype: str
    activate: Callable[[], None]
    """Make it the backend's current model (the engine calls it holding the forward lock, once
    the previous model's scheduler has stopped)."""


class Backend(Protocol):
    name: str

    @property
    def threads(self) -> int:
        """CPU threads a forward uses."""
        ...

    @property
    def decode_kernel(self) -> str:
        """The arithmetic of prompts and generated tokens: "mixed", "int16", "int8" or "exact"
        (the fused native step's modes) or "torch" (op by op)."""
        ...

    @property
    def embed_device(self) -> str:
        """Where a sentence encoder loaded beside this backend runs ("cpu", "cuda:0", ...)."""
        ...

    embed_backend: str
    """Which encoder runs beside it (embedder.ENCODER_BACKENDS: "auto" picks by device)."""

    def prepare(self, files: ModelFiles, spec: ModelSpec, bar: tqdm,
                kv: KVBudget) -> Prepared:
        """Weights in the backend's layout and a KV store sized by `kv`; raises
        UnsupportedBackendError for a model, device or dtype it cannot run."""
        ...

    def step(self, tokens: list[int], positions: list[int],
             seqs: list[SeqStep]) -> np.ndarray:
        """Logits [sequences wanting them, vocab] after one forward of the current model over
        its store (the scheduler's thread, holding the forward lock)."""
        ...

    def decoder_embed(self, tokens: list[list[int]], *, batch_size: int, chunk: int,
                      lock: AbstractContextManager[Any]) -> np.ndarray:
        """The current model's final-normed hidden states mean-pooled over each token list and
        L2-normalized, float32 [len(tokens), dim]; every forward holds `lock`."""
        ...

    def release(self) -> None:
        """Drop the current model (engine close)."""
        ...


@dataclass(frozen=True, kw_only=True)
class BackendEntry:
    """One backend as the registry knows it."""

    name: str
    info: Callable[[], BackendInfo]
    """What it can do on this machine (probed, cheaply: it must not import torch when torch is
    not what the backend runs on)."""
    serves: Callable[[str], bool]
    """Whether backend="auto" may try it for a run on this device ("auto", "cpu", "cuda:0")."""
    options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """Each option it takes whose values are a fixed set, and those values ("auto" first)."""
    factory: Callable[..., Backend]
    """(device=..., threads=..., **options) -> a Backend."""
    order: int = 100
    """backend="auto" tries the eligible backends by this, lowest first."""
    accelerated: Callable[[], bool] = lambda: False
    """Whether it runs an accelerator present on this machine (Metal, CUDA), found without
    importing its library: auto tries such a backend first for a model none is proven on."""


_REGISTRY: dict[str, BackendEntry] = {}
_PACKAGES = ("llama_runtime.native", "llama_runtime.torch_backend", "llama_runtime.mlx_backend")
"""The backends' packages: importing one registers it."""


def register(e: BackendEntry) -> None:
    _REGISTRY[e.name] = e


def entries() -> list[BackendEntry]:
    """Every registered backend, in `auto`'s order."""
    for package in _PACKAGES:
        importlib.import_module(package)
    return sorted(_REGISTRY.values(), key=lambda e: e.order)


def entry(name: str) -> BackendEntry | None:
    return next((e for e in entries() if e.name == name), None)


def check_options(e: BackendEntry, options: Mapping[str, Any]) -> None:
    """Refuse, naming the values, an option value the backend does not take."""
    for key, value in options.items():
        allowed = e.options.get(key)
        if allowed is not None and value not in allowed:
            others = [o.name for o in entries() if o is not e and value in o.options.get(key, ())]
            hint = f" ({value!r} needs backend={others[0]!r})" if others else ""
            raise InvalidParamsError(
                f"{key} must be one of {', '.join(map(repr, allowed))} on the {e.name} backend, "
                f"got {value!r}{hint}")


def fits(e: BackendEntry, options: Mapping[str, Any]) -> bool:
    """Whether every option value is one the backend takes."""
    return all(v in e.options.get(k, (v,)) for k, v in options.items())
