"""`MLXBackend`: one model on MLX, on Metal (Apple silicon) or MLX's CPU backend, under the same
model definitions (llama_models' DecoderModel over `MLXOps`), the same scheduler and the same
`llama_kv` block tables as the other backends."""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import AbstractContextManager
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from llama_engine import ModelSpec, UnsupportedBackendError
from llama_models import ModelFiles
from llama_models.checkpoint import FLOAT_NAMES, release_pages
from llama_runtime.backend import KVBudget, Prepared
from llama_runtime.backends import METAL_DEVICES, physical_cores
from llama_runtime.compute import DEFAULT_BATCH_SIZE
from llama_runtime.embedder import length_batches
from llama_runtime.loading import host_available_memory
from llama_runtime.mlx_backend.ops import MLXOps
from llama_runtime.mlx_backend.paged import CausalBatch, MLXKVStore, StepBatch
from llama_runtime.mlx_backend.weights import (
    DEQUANTIZED,
    KEPT_QUANTIZED,
    QuantWeight,
    float_array,
    prepare_weight,
    weight_path,
)
from llama_runtime.step import SeqStep

__all__ = ["DTYPES", "MLXBackend", "mlx_device", "mlx_stream"]

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except AttributeError:  # a build without the Metal module
        return False


def mlx_device(device: str) -> str:
    """"metal" or "cpu" for a device asked for ("auto": Metal where there is one), or a typed
    error naming what to choose."""
    if device == "auto":
        return "metal" if metal_available() else "cpu"
    if device in METAL_DEVICES:
        if not metal_available():
            raise UnsupportedBackendError(
                f"device {device!r} is MLX on Metal, which needs a Mac with Apple silicon; "
                "this machine has none: use device='cpu' (MLX's CPU backend) or backend='auto'")
        return "metal"
    if device == "cpu":
        return "cpu"
    raise UnsupportedBackendError(
        f"the MLX backend runs on Metal or the CPU, not {device!r}; for CUDA use "
        "backend='torch'")


def mlx_stream(device: str) -> mx.Device:
    """MLX's device for one mlx_device() gives."""
    return mx.gpu if device == "metal" else mx.cpu


class MLXBackend:
    """One model on one MLX device."""

    name = "mlx"

    def __init__(self, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 kv_dtype: str = "auto", weights: str = "auto", decode: str = "auto") -> None:
        del decode  # "auto" only (the registry refuses the others): the compute dtype's
        self._device_name = mlx_device(device)
        self._dtype_name = dtype
        self._kv_dtype_name = kv_dtype
        self._dequant = weights == "dequant"
        self._threads = threads or physical_cores()
        self._model: Any = None
        self._store: MLXKVStore | None = None
        self._stream = mlx_stream(self._device_name)

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def decode_kernel(self) -> str:
        return "mlx"

    @property
    def embed_device(self) -> str:
        return self._device_name

    embed_backend = "mlx"
    """A sentence encoder beside this backend runs on MLX too."""

    def prepare(self, files: ModelFiles, spec: ModelSpec, bar: tqdm,
                kv: KVBudget) -> Prepared:
        device = mlx_device(spec.device) if spec.device != "auto" else self._device_name
        stream = mlx_stream(device)
        dtype_name = spec.dtype if spec.dtype != "auto" else self._dtype_name
        if dtype_name == "auto":  # Metal's fast path is half precision; the CPU's is float32
            dtype_name = "float16" if device == "metal" else "float32"
        if dtype_name not in DTYPES:
            raise UnsupportedBackendError(
                f"the MLX backend computes in {', '.join(DTYPES)}, not {dtype_name}")
        dtype = DTYPES[dtype_name]
        rope = files.rope
        if rope.rotary_dim != rope.head_dim:
            raise UnsupportedBackendError(
                f"{spec.model}: the MLX backend rotates whole heads, and this model rotates "
                f"{rope.rotary_dim} of each head's {rope.head_dim} dimensions; use "
                "backend='torch'")
        cfg = files.config
        with mx.stream(stream):
            weights = self._prepare_weights(files, dtype, bar)
            model = files.build(weights, MLXOps(dtype))
            kv_name = dtype_name if self._kv_dtype_name == "auto" else self._kv_dtype_name
            kv_dtype = DTYPES[kv_name]
            num_blocks = kv.blocks(cfg, kv_dtype.size, _available_memory(device))
            store = MLXKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks,
                               kv.block_size, kv_dtype)

        def activate() -> None:
            self._model, self._store = model, store
            self._device_name, self._stream = device, stream

        return Prepared(store=store, num_blocks=num_blocks,
                        weight_paths={name: self._path(raw) for name, raw in
                                      files.weights.items()},
                        device=device, dtype=dtype_name, activate=activate)

    def _path(self, raw: Any) -> str:
        path = weight_path(raw)
        return DEQUANTIZED if self._dequant else path

    def _prepare_weights(self, files: ModelFiles, dtype: mx.Dtype,
                         bar: tqdm) -> dict[str, Any]:
        out: dict[str, Any] = {}
        widened: Counter[str] = Counter()
        for name, raw in files.weights.items():
            if self._dequant:
                w = float_array(raw, dtype)
            else:
                if weight_path(raw) != KEPT_QUANTIZED and raw.qtype not in FLOAT_NAMES:
                    widened[GGMLQuantizationType(raw.qtype).name] += 1
                w = prepare_weight(raw, dtype)
            mx.eval(w.arrays if isinstance(w, QuantWeight) else w)
            out[name] = w
            release_pages(raw.data)
            bar.update(1)
        if widened:
            log.info("MLX keeps no %s weights quantized (its groups hold one scale per 32 "
                     "elements): %s dequantized to %s at load",
                     "/".join(sorted(widened)),
                     ", ".join(f"{n} {t} tensor{'s' * (n > 1)}" for t, n in widened.items()),
                     str(dtype).removeprefix("mlx.core."))
        return out

    def release(self) -> None:
        self._model = self._store = None

    def step(self, tokens: list[int], positions: list[int],
             seqs: list[SeqStep]) -> np.ndarray:
        model, store = self._model, self._store
        assert model is not None and store is not None
        with store.lock, mx.stream(self._stream):
            batch = StepBatch(store, seqs)
            logits = model.forward(mx.array(np.asarray(tokens, dtype=np.int32)),
                                   np.asarray(positions, dtype=np.int64), batch)
            logits = logits.astype(mx.float32)
            mx.eval(logits, store.k, store.v)
        return np.array(logits)

    def decoder_embed(self, tokens: list[list[int]], *, batch_size: int, chunk: int,
                      lock: AbstractContextManager[Any]) -> np.ndarray:
        """Mean of the final-normed hidden states over each token list, L2-normalized (the
        batch's own keys: nothing touches the KV cache)."""
        model = self._model
        assert model is not None
        out = np.zeros((len(tokens), model.cfg.dim), dtype=np.float32)
        for rows in length_batches([len(t) for t in tokens], batch_size or DEFAULT_BATCH_SIZE):
            seqs = [list(tokens[i]) for i in rows]
            lengths = [len(s) for s in seqs]
            flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32)
            positions = np.concatenate([np.arange(n) for n in lengths])
            with lock, mx.stream(self._stream):
                h = model.forward(mx.array(flat), positions, CausalBatch(lengths),
                                  hidden=True).astype(mx.float32)
                ends = np.cumsum(lengths)
                sums = mx.stack([h[e - n:e].sum(0) for e, n in zip(ends, lengths, strict=True)])
                means = sums / mx.array(np.asarray(lengths, dtype=np.float32))[:, None]
                means = means / mx.maximum(mx.sqrt((means * means).sum(-1, keepdims=True)),
                                           1e-12)
                out[rows] = np.array(means)
        return out


def _available_memory(device: str) -> int:
    """Bytes free for the KV cache: Metal's recommended working set, or the host's
    MemAvailable."""
    if device == "metal":
        try:
            info = mx.device_info()
            return int(info.get("max_recommended_working_set_size", info["memory_size"]))
        except (AttributeError, KeyError):
            pass
    return host_available_memory()
