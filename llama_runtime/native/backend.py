"""`NativeBackend`: the CPU without torch. The fused native step (kernels/fused.py) over numpy
weights and K/V, driven through ctypes; GGUF files and HF safetensors directories of every
family whose layers the fused step runs."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from tqdm import tqdm

from llama_engine import ModelSpec, UnsupportedBackendError
from llama_models import ModelFiles
from llama_runtime.backend import KVBudget, Prepared
from llama_runtime.backends import CPU_DECODE, cpu_kv_dtype, physical_cores
from llama_runtime.kernels.fused import decoder_embeddings
from llama_runtime.kernels.library import KernelsUnavailable, library
from llama_runtime.kv_store import HostKVStore
from llama_runtime.loading import host_available_memory
from llama_runtime.native.model import NativeModel, unsupported
from llama_runtime.step import SeqStep

__all__ = ["NativeBackend"]


class NativeBackend:
    """One model on the CPU, float32 activations, no torch."""

    name = "native"
    embed_backend = "auto"

    def __init__(self, *, device: str = "auto", threads: int | None = None,
                 decode: str = "auto", kv_dtype: str = "auto", weights: str = "auto") -> None:
        if device not in ("auto", "cpu"):
            raise UnsupportedBackendError(
                f"the native backend runs on the CPU, not {device!r}; use backend='torch'")
        del weights  # "auto" and "quantized" both keep the kept types quantized
        self._decode = CPU_DECODE if decode == "auto" else decode
        self._kv_dtype_name = kv_dtype if kv_dtype != "auto" else cpu_kv_dtype(self._decode)
        self._threads = threads or physical_cores()
        try:
            library()  # installed and loadable, or refused now
        except KernelsUnavailable as e:
            raise UnsupportedBackendError(f"{e}; or use backend='torch'") from e
        self._model: NativeModel | None = None
        self._store: HostKVStore | None = None

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def decode_kernel(self) -> str:
        return self._decode

    @property
    def embed_device(self) -> str:
        return "cpu"

    def prepare(self, files: ModelFiles, spec: ModelSpec, bar: tqdm,
                kv: KVBudget) -> Prepared:
        if spec.device not in ("auto", "cpu"):
            raise UnsupportedBackendError(
                f"the native backend runs on the CPU, not {spec.device!r}; use backend='torch'")
        if spec.dtype not in ("auto", "float32"):
            raise UnsupportedBackendError(
                f"the native backend computes in float32, not {spec.dtype}; use "
                "backend='torch' for other dtypes")
        why = unsupported(files)
        if why is not None:
            raise UnsupportedBackendError(f"{spec.model}: {why}; use backend='torch'")
        cfg = files.config
        try:
            model = NativeModel(files, decode=self._decode, progress=lambda: bar.update(1))
        except (ValueError, NotImplementedError, KeyError) as e:  # dims, types it cannot run
            raise UnsupportedBackendError(
                f"{spec.model}: the native kernels cannot run this model ({e}); use "
                "backend='torch'") from e
        kv_bytes = 2 if self._kv_dtype_name == "float16" else 4
        num_blocks = kv.blocks(cfg, kv_bytes, host_available_memory())
        store = HostKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks,
                              kv.block_size, self._kv_dtype_name)

        def activate() -> None:
            self._model, self._store = model, store

        return Prepared(store=store, num_blocks=num_blocks,
                        weight_paths=dict(model.weight_paths), device="cpu", dtype="float32",
                        activate=activate)

    def release(self) -> None:
        self._model = self._store = None

    def step(self, tokens: list[int], positions: list[int],
             seqs: list[SeqStep]) -> np.ndarray:
        model, store = self._model, self._store
        assert model is not None and store is not None
        model.fused.set_threads(self._threads)
        return model.step(tokens, positions, seqs, store)

    def decoder_embed(self, tokens: list[list[int]], *, batch_size: int, chunk: int,
                      lock: AbstractContextManager[Any]) -> np.ndarray:
        model = self._model  # (batch_size does not apply: one text at a time)
        assert model is not None
        return decoder_embeddings(model.fused, model.embed, tokens, chunk=chunk,
                                  threads=self._threads, lock=lock)
