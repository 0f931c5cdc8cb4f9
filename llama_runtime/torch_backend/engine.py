"""`TorchEngine`: the torch backend (CPU now; CUDA with the same code). On the CPU its steps
run in the fused native step over quantized weights (fused.py); the op-by-op torch forward
serves decode="torch", CUDA and decoder embeddings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llama_engine import (
    InvalidParamsError,
    ModelHandle,
    ModelSpec,
    UnsupportedBackendError,
)
from llama_models import RawTensor
from llama_models.checkpoint import FLOAT_NAMES, release_pages
from llama_models.decoder import fused_refusal
from llama_models.dequant import dequantize
from llama_runtime.backends import CPU_DECODE, cpu_kv_dtype, physical_cores, pick_device
from llama_runtime.batched import (
    BatchedEngine,
    fingerprint,
    host_available_memory,
)
from llama_runtime.kernels.library import KernelsUnavailable, library
from llama_runtime.step import SeqStep
from llama_runtime.torch_backend.embedder import decoder_embeddings
from llama_runtime.torch_backend.fused import DECODE_KERNELS, FusedDecoder
from llama_runtime.torch_backend.ops import TorchOps, float_tensor
from llama_runtime.torch_backend.paged import PagedKVStore, StepBatch
from llama_runtime.torch_backend.qweights import KEPT_QUANTIZED, repack, weight_path

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchEngine(BatchedEngine):
    """One model on one torch device."""

    backend = "torch"

    def __init__(self, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 progress: bool = True, prefill_chunk: int = 512, kv_memory: int | str = "auto",
                 kv_block_size: int = 16, max_batch: int = 32, kv_policy: str = "wait",
                 weights: str = "auto", embed_model: str | None = None,
                 decode: str = "auto", kv_dtype: str = "auto") -> None:
        super().__init__(progress=progress, prefill_chunk=prefill_chunk, kv_memory=kv_memory,
                         kv_block_size=kv_block_size, max_batch=max_batch, kv_policy=kv_policy,
                         embed_model=embed_model)
        if weights not in ("auto", "dequant", "quantized"):
            raise InvalidParamsError(
                f"weights must be 'auto', 'dequant' or 'quantized', got {weights!r}")
        self._weights_mode = weights
        if decode not in ("auto", "torch", *DECODE_KERNELS):
            raise InvalidParamsError(
                f"decode must be one of 'auto', {', '.join(map(repr, DECODE_KERNELS))}, "
                f"'torch', got {decode!r}")
        self._decode_mode = decode
        if kv_dtype not in ("auto", *_DTYPES):
            raise InvalidParamsError(
                f"kv_dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {kv_dtype!r}")
        self._kv_dtype_name = kv_dtype
        self._fused: FusedDecoder | None = None
        self._quantized = False
        self._device_name = device
        self._dtype_name = dtype
        self.check_threads(threads)
        torch.set_num_threads(threads or physical_cores())
        self._model: Any = None
        self._device = torch.device("cpu")

    def _load(self, spec: ModelSpec, bar: tqdm) -> ModelHandle:
        device = torch.device(pick_device(spec.device if spec.device != "auto"
                                          else self._device_name))
        dtype_name = spec.dtype if spec.dtype != "auto" else self._dtype_name
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        dtype = _DTYPES[dtype_name]
        files, tokenizer, ctx = self._open(spec, bar)
        ckpt, cfg = files.checkpoint, files.config
        quantized = self._weights_mode != "dequant" and device.type == "cpu"
        if quantized:
            try:
                library()  # the installed kernels, before committing to the quantized path
            except KernelsUnavailable as e:
                if self._weights_mode == "quantized":
                    raise UnsupportedBackendError(f"{e}; or pass weights='dequant'") from e
                log.warning("%s; weights are dequantized to float instead", e)
                quantized = False
        self._quantized = quantized
        prepared = self._prepare_weights(files.weights, device, dtype, bar, quantized)
        ops = TorchOps(device, dtype)
        kv_dtype = self._kv_dtype(device, dtype,
                                  quantized and fused_refusal(cfg, files.rope) is None)
        num_blocks = self._kv_blocks(cfg, torch.empty((), dtype=kv_dtype).element_size(),
                                     _available_memory(device))
        model = files.build(prepared, ops)
        fused = self._fused_decoder(model, device, dtype, kv_dtype)
        store = PagedKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks,
                             self._kv_block_size, device, kv_dtype)
        handle = ModelHandle(
            name=spec.model, path=str(ckpt.path), architecture=ckpt.architecture,
            vocab_size=cfg.vocab_size, context_length=ctx, n_params=ckpt.n_params,
            quant_types=ckpt.quant_types(), has_chat_template=tokenizer.chat_template
            is not None, eos_token_ids=tuple(sorted(tokenizer.eog_ids)), backend=self.backend,
            device=str(device), dtype=dtype_name)
        # the file's tensors are not kept: only how each one is held
        self._install(tokenizer=tokenizer, ctx=ctx, fingerprint=fingerprint(ckpt, cfg, dtype_name),
                      num_blocks=num_blocks, store=store, handle=handle,
                      weight_paths={name: weight_path(raw, quantized)
                                    for name, raw in files.weights.items()},
                      activate=lambda: self._activate(model, fused, device, dtype),
                      kv_reach=cfg.kv_reach)
        return handle

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def decode_kernel(self) -> str:
        return "torch" if self._fused is None else self._fused_kernel()

    def _activate(self, model: Any, fused: FusedDecoder | None, device: torch.device,
                  dtype: torch.dtype) -> None:
        self._model, self._fused, self._device, self._dtype = model, fused, device, dtype

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
                    release_pages(raw.data)
                else:
                    data = torch.from_numpy(np.array(raw.data, copy=True)).to(device)
                    w = dequantize(data, raw.qtype, raw.shape).to(dtype)
                    release_pages(raw.data)
                out[name] = w.contiguous()
                bar.update(1)
        return out

    def _embed_device(self) -> str:
        return self._device_name if self._handle is None else str(self._device)

    def _decoder_embed(self, texts: list[str], truncate: bool, batch_size: int) -> np.ndarray:
        tokens = self._decoder_tokens(texts, truncate)

        def locked(fn: Any) -> Any:
            with self._forward_lock:
                return fn()

        return decoder_embeddings(self._model, tokens, self._device, batch_size=batch_size,
                                  run=locked)

    def _release_model(self) -> None:
        super()._release_model()
        self._model = self._fused = None

    def _run_step(self, tokens: list[int], positions: list[int],
                  seqs: list[SeqStep]) -> np.ndarray:
        with torch.inference_mode():
            fused = self._fused
            if fused is None:
                return self._forward(tokens, positions, seqs).numpy()
            return fused.step(tokens, positions, seqs, self._store).numpy()

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
