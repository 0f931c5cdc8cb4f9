"""Opening a model for an engine, the same for every backend: its files, tokenizer and context
length, the KV cache's size in blocks, the handle callers see, and the fingerprint that ties
saved sessions and prefix hashes to it."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tqdm import tqdm

from llama_engine import InvalidParamsError, ModelHandle, ModelSpec
from llama_kv import kv_budget_blocks, kv_bytes_per_block
from llama_models import ModelFiles, open_model
from llama_tokenizer import Tokenizer

__all__ = ["AUTO_KV_CAP_BYTES", "context_length", "fingerprint", "host_available_memory",
           "kv_blocks", "model_handle", "open_files"]

AUTO_KV_CAP_BYTES = 4 * 2**30
"""kv_memory="auto" never takes more than this."""


def context_length(spec: ModelSpec, trained: int) -> int:
    """The engine's context: spec.context_length, at most the trained one (else an error)."""
    if spec.context_length is None:
        return trained
    if spec.context_length > trained:
        raise InvalidParamsError(
            f"context_length={spec.context_length} exceeds the model's trained context "
            f"of {trained}; pass at most {trained}")
    return spec.context_length


def open_files(spec: ModelSpec, bar: tqdm, files: ModelFiles | None = None
               ) -> tuple[ModelFiles, Tokenizer, int]:
    """The model's files (`files` when already opened), tokenizer and context length (the load
    bar's first step; the bar then counts one step per weight tensor)."""
    files = files or open_model(spec.model)
    ckpt = files.checkpoint
    if ckpt.format == "gguf":
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata)
    else:
        tokenizer = Tokenizer.from_hf_dir(ckpt.path)
    ctx = context_length(spec, files.config.context_length)
    files.rope = files.rope.for_context(ctx)
    bar.total = 1 + len(files.weights)
    bar.update(1)
    return files, tokenizer, ctx


def kv_blocks(cfg: Any, *, kv_memory: int | str, block_size: int, dtype_bytes: int,
              available_bytes: int) -> int:
    """KV blocks the kv_memory budget buys for a model of config `cfg` ("auto": capped at
    AUTO_KV_CAP_BYTES)."""
    per_block = kv_bytes_per_block(
        n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        dtype_bytes=dtype_bytes, block_size=block_size)
    num_blocks = kv_budget_blocks(kv_memory, bytes_per_block=per_block,
                                  available_bytes=available_bytes)
    if kv_memory == "auto":
        num_blocks = min(num_blocks, AUTO_KV_CAP_BYTES // per_block)
    return num_blocks


def model_handle(spec: ModelSpec, files: ModelFiles, tokenizer: Tokenizer, ctx: int, *,
                 backend: str, device: str, dtype: str) -> ModelHandle:
    ckpt, cfg = files.checkpoint, files.config
    return ModelHandle(
        name=spec.model, path=str(ckpt.path), architecture=ckpt.architecture,
        vocab_size=cfg.vocab_size, context_length=ctx, n_params=ckpt.n_params,
        quant_types=ckpt.quant_types(), has_chat_template=tokenizer.chat_template is not None,
        eos_token_ids=tuple(sorted(tokenizer.eog_ids)), backend=backend, device=device,
        dtype=dtype)


def fingerprint(files: ModelFiles, dtype: str) -> str:
    """Names the model a KV cache belongs to: file name and size, configuration, dtype."""
    ckpt, cfg = files.checkpoint, files.config
    size = ckpt.path.stat().st_size if ckpt.path.is_file() else ckpt.n_params
    text = f"{ckpt.path.name}:{size}:{cfg!r}:{dtype}"
    return f"{ckpt.architecture}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def host_available_memory() -> int:
    """Bytes of host memory available (MemAvailable), for sizing a host KV cache."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
