"""`TorchBackend`: the torch backend (CPU now; CUDA with the same code). On the CPU its steps
run in the fused native step over quantized weights (fused.py); the op-by-op torch forward
serves decode="torch", CUDA and decoder embeddings."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llama_engine import ModelSpec, UnsupportedBackendError
from llama_models import ModelFiles, RawTensor
from llama_models.checkpoint import FLOAT_NAMES, release_pages
from llama_models.decoder import fused_refusal
from llama_models.dequant import dequantize
from llama_runtime.backend import KVBudget, Prepared
from llama_runtime.backends import CPU_DECODE, cpu_kv_dtype, physical_cores, pick_device
from llama_runtime.kernels.fused import decoder_embeddings as fused_decoder_embeddings
from llama_runtime.kernels.library import KernelsUnavailable, library
from llama_runtime.kv_store import KV_DTYPES, HostKVStore
from llama_runtime.loading import host_available_memory
from llama_runtime.step import SeqStep
from llama_runtime.torch_backend.embedder import decoder_embeddings
from llama_runtime.torch_backend.fused import FusedDecoder
from llama_runtime.torch_backend.ops import TorchOps, float_tensor
from llama_runtime.torch_backend.paged import PagedKVStore, StepBatch
from llama_runtime.torch_backend.qweights import KEPT_QUANTIZED, repack, weight_path

__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchBackend:
    """One model on one torch device."""

    name = "torch"
    embed_backend = "auto"

    def __init__(self, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 weights: str = "auto", decode: str = "auto", kv_dtype: str = "auto") -> None:
        self._weights_mode = weights
        self._decode_mode = decode
        self._kv_dtype_name = kv_dtype
        self._fused: FusedDecoder | None = None
        self._device_name = device
        self._dtype_name = dtype
        torch.set_num_threads(threads or physical_cores())
        self._model: Any = None
        self._store: PagedKVStore | None = None
        self._device = torch.device("cpu")
        self._loaded = False

    def prepare(self, files: ModelFiles, spec: ModelSpec, bar: tqdm,
                kv: KVBudget) -> Prepared:
        device = torch.device(pick_device(spec.device if spec.device != "auto"
                                          else self._device_name))
        dtype_name = spec.dtype if spec.dtype != "auto" else self._dtype_name
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        dtype = _DTYPES[dtype_name]
        cfg = files.config
        quantized = self._weights_mode != "dequant" and device.type == "cpu"
        if quantized:
            try:
                library()  # the installed kernels, before committing to the quantized path
            except KernelsUnavailable as e:
                if self._weights_mode == "quantized":
                    raise UnsupportedBackendError(f"{e}; or pass weights='dequant'") from e
                log.warning("%s; weights are dequantized to float instead", e)
                quantized = False
        prepared = self._prepare_weights(files.weights, device, dtype, bar, quantized)
        ops = TorchOps(device, dtype)
        kv_dtype = self._kv_dtype(device, dtype,
                                  quantized and fused_refusal(cfg, files.rope) is None)
        num_blocks = kv.blocks(cfg, torch.empty((), dtype=kv_dtype).element_size(),
                               _available_memory(device))
        model = files.build(prepared, ops)
        fused = self._fused_decoder(model, device, dtype, kv_dtype)
        shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks, kv.block_size)
        host_dtype = str(kv_dtype).removeprefix("torch.")
        host: HostKVStore | None = None
        if device.type == "cpu" and host_dtype in KV_DTYPES:  # the one host store, as tensors
            host = HostKVStore(*shape, host_dtype)
            store = PagedKVStore.over_host(host)
        else:
            store = PagedKVStore(*shape, device, kv_dtype)

        def activate() -> None:
            self._model, self._fused, self._store = model, fused, store
            self._device = device
            self._loaded = True

        # the file's tensors are not kept: only how each one is held
        return Prepared(store=host if host is not None else store, num_blocks=num_blocks,
                        weight_paths={name: weight_path(raw, quantized)
                                      for name, raw in files.weights.items()},
                        device=str(device), dtype=dtype_name, activate=activate)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def decode_kernel(self) -> str:
        return "torch" if self._fused is None else self._fused_kernel()

    def _kv_dtype(self, device: torch.device, dtype: torch.dtype,
                  fused: bool) -> torch.dtype:
        """The KV cache's dtype: kv_dtype, or for "auto" what the fused CPU step's kernel keeps
        (float16 beside int8, float32 beside the others: backends.cpu_kv_dtype), else the
        compute dtype. `fused`: quantized weights that the fused step can run (else the model
        runs op by op, in its compute dtype)."""
        if self._kv_dtype_name != "auto":
            return _DTYPES[self._kv_dtype_name]
        if (self._decode_mode != "torch" and fused and device.type == "cpu"
                and dtype == torch.float32):
            return _DTYPES[cpu_kv_dtype(self._fused_kernel())]
        return dtype

    def _fused_kernel(self) -> str:
        """The fused step's mode for `decode` (a key of DECODE_MODES; "auto": CPU_DECODE)."""
        return CPU_DECODE if self._decode_mode == "auto" else self._decode_mode

    def _fused_decoder(self, model: Any, device: torch.device, dtype: torch.dtype,
                       kv_dtype: torch.dtype) -> FusedDecoder | None:
        """The native step for `decode` ("auto": CPU_DECODE where it can run), or None for the
        op-by-op torch path."""
        mode = self._decode_mode
        if mode == "torch":
            return None
        why = FusedDecoder.supports(model, device, dtype, kv_dtype)
        if why is None:
            try:
                library()
            except KernelsUnavailable as e:
                why = str(e)
        if why is not None:
            if mode not in ("auto", "exact"):  # op by op is exact too (float, in order)
                raise UnsupportedBackendError(f"decode={mode!r}: {why}; pass decode='torch'")
            log.info("the fused decode step does not serve this model (%s); running it op by "
                     "op", why)
            return None
        return FusedDecoder(model, decode=self._fused_kernel())

    @staticmethod
    def _prepare_weights(weights: dict[str, RawTensor], device: torch.device,
                         dtype: torch.dtype, bar: tqdm, quantized: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with torch.inference_mode():
            for name, raw in weights.items():
                if weight_path(raw, quantized) == KEPT_QUANTIZED:
                    out[name] = repack(raw)
                    release_pages(raw.data)
                    bar.update(1)
                    continue
                if raw.qtype in FLOAT_NAMES:
                    w = float_tensor(raw).to(device=device, dtype=dtype)
                else:
                    data = torch.from_numpy(np.array(raw.data, copy=True)).to(device)
                    w = dequantize(data, raw.qtype, raw.shape).to(dtype)
                release_pages(raw.data)
                out[name] = w.contiguous()
                bar.update(1)
        return out

    @property
    def embed_device(self) -> str:
        return str(self._device) if self._loaded else self._device_name

    def decoder_embed(self, tokens: list[list[int]], *, batch_size: int, chunk: int,
                      lock: AbstractContextManager[Any]) -> np.ndarray:
        fused = self._fused
        if fused is not None:  # the CPU: the native backend's path, the same bits
            return fused_decoder_embeddings(fused.fused, fused.embed, tokens, chunk=chunk,
                                            threads=torch.get_num_threads(), lock=lock)

        def locked(fn: Any) -> Any:
            with lock:
                return fn()

        return decoder_embeddings(self._model, tokens, self._device, batch_size=batch_size,
                                  run=locked)

    def release(self) -> None:
        self._model = self._fused = self._store = None

    def step(self, tokens: list[int], positions: list[int],
             seqs: list[SeqStep]) -> np.ndarray:
        with torch.inference_mode():
            fused, store = self._fused, self._store
            assert store is not None
            if fused is None:
                return self._forward(tokens, positions, seqs).numpy()
            fused.fused.set_threads(torch.get_num_threads())
            return fused.step(tokens, positions, seqs, store).numpy()

    def _forward(self, tokens: list[int], positions: list[int],
                 seqs: list[SeqStep]) -> torch.Tensor:
        """The op-by-op forward (prompt chunks, and every step when decode='torch')."""
        dev = self._device
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        logits = self._model.forward(ids, pos, StepBatch(self._store, seqs))
        return logits.float().cpu()


def _available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_memory()
