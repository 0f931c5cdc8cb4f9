"""`NativeEngine`: the CPU backend without torch. The same fused native step as the torch
backend's CPU path (csrc/), built as a plain library and driven through ctypes, over numpy
weights and K/V; only embedding with a sentence encoder imports torch (on first use)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from llama_engine import InvalidParamsError, ModelHandle, ModelSpec, UnsupportedBackendError
from llama_runtime.backends import CPU_DECODE, cpu_kv_dtype, physical_cores
from llama_runtime.batched import BatchedEngine, fingerprint, host_available_memory
from llama_runtime.kernels.library import DECODE_MODES, library
from llama_runtime.native.model import NativeKVStore, NativeModel, unsupported
from llama_runtime.step import SeqStep

__all__ = ["NativeEngine"]


class NativeEngine(BatchedEngine):
    """One model (GGUF, or an HF safetensors directory) on the CPU, float32 activations, no
    torch."""

    backend = "native"

    def __init__(self, *, device: str = "auto", threads: int | None = None,
                 progress: bool = True, prefill_chunk: int = 512, kv_memory: int | str = "auto",
                 kv_block_size: int = 16, max_batch: int = 32, kv_policy: str = "wait",
                 embed_model: str | None = None, decode: str = "auto",
                 kv_dtype: str = "auto", weights: str = "auto") -> None:
        super().__init__(progress=progress, prefill_chunk=prefill_chunk, kv_memory=kv_memory,
                         kv_block_size=kv_block_size, max_batch=max_batch, kv_policy=kv_policy,
                         embed_model=embed_model)
        if device not in ("auto", "cpu"):
            raise UnsupportedBackendError(
                f"the native backend runs on the CPU, not {device!r}; use backend='torch'")
        if weights not in ("auto", "quantized"):
            raise InvalidParamsError(
                f"weights must be 'auto' or 'quantized' on the native backend, got {weights!r} "
                "('dequant' needs backend='torch')")
        if decode != "auto" and decode not in DECODE_MODES:
            raise InvalidParamsError(
                f"decode must be one of 'auto', {', '.join(map(repr, DECODE_MODES))} on the native "
                f"backend, got {decode!r} ('torch' needs backend='torch')")
        if kv_dtype not in ("auto", "float32", "float16"):
            raise InvalidParamsError(
                f"kv_dtype must be 'auto', 'float32' or 'float16' on the native backend, got "
                f"{kv_dtype!r}")
        self._decode = CPU_DECODE if decode == "auto" else decode
        self._kv_dtype_name = kv_dtype if kv_dtype != "auto" else cpu_kv_dtype(self._decode)
        self.check_threads(threads)
        self._threads = threads or physical_cores()
        try:
            self._lib = library()
        except RuntimeError as e:
            raise UnsupportedBackendError(f"{e}; use backend='torch'") from e
        self._native: NativeModel | None = None

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def decode_kernel(self) -> str:
        return self._decode

    def _load(self, spec: ModelSpec, bar: tqdm) -> ModelHandle:
        if spec.device not in ("auto", "cpu"):
            raise UnsupportedBackendError(
                f"the native backend runs on the CPU, not {spec.device!r}; use backend='torch'")
        if spec.dtype not in ("auto", "float32"):
            raise UnsupportedBackendError(
                f"the native backend computes in float32, not {spec.dtype}; use "
                "backend='torch' for other dtypes")
        files, tokenizer, ctx = self._open(spec, bar)
        why = unsupported(files)
        if why is not None:
            raise UnsupportedBackendError(f"{spec.model}: {why}; use backend='torch'")
        ckpt, cfg = files.checkpoint, files.config
        try:
            model = NativeModel(files, decode=self._decode, progress=lambda: bar.update(1))
        except (ValueError, NotImplementedError, KeyError) as e:  # dims, types it cannot run
            raise UnsupportedBackendError(
                f"{spec.model}: the native kernels cannot run this model ({e}); use "
                "backend='torch'") from e
        kv_bytes = 2 if self._kv_dtype_name == "float16" else 4
        num_blocks = self._kv_blocks(cfg, kv_bytes, host_available_memory())
        store = NativeKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks,
                              self._kv_block_size, self._kv_dtype_name)
        handle = ModelHandle(
            name=spec.model, path=str(ckpt.path), architecture=ckpt.architecture,
            vocab_size=cfg.vocab_size, context_length=ctx, n_params=ckpt.n_params,
            quant_types=ckpt.quant_types(), has_chat_template=tokenizer.chat_template
            is not None, eos_token_ids=tuple(sorted(tokenizer.eog_ids)), backend=self.backend,
            device="cpu", dtype="float32")
        self._install(tokenizer=tokenizer, ctx=ctx,
                      fingerprint=fingerprint(ckpt, cfg, "float32"), num_blocks=num_blocks,
                      store=store, weight_paths=dict(model.weight_paths), handle=handle,
                      activate=lambda: setattr(self, "_native", model), kv_reach=cfg.kv_reach)
        return handle

    def _release_model(self) -> None:
        super()._release_model()
        self._native = None

    def _run_step(self, tokens: list[int], positions: list[int],
                  seqs: list[SeqStep]) -> np.ndarray:
        native = self._native
        assert native is not None
        # the library's thread count is process-wide: each engine sets its own before its
        # forwards (which the compute lock serialises)
        self._lib.le_set_threads(self._threads)
        return native.step(tokens, positions, seqs, self._store)

    def _decoder_embed(self, texts: list[str], truncate: bool, batch_size: int) -> np.ndarray:
        self.model  # noqa: B018 - raises SessionError unless a model is loaded
        tokens = self._decoder_tokens(texts, truncate)
        out = []
        for ids in tokens:  # one text at a time (batch_size does not apply here)
            with self._forward_lock:  # never beside a scheduler step, nor a reload
                native = self._native
                assert native is not None
                self._lib.le_set_threads(self._threads)
                out.append(native.mean_hidden(ids, chunk=self._prefill_chunk))
        return np.stack(out)
