"""llama_runtime: backends, their capability matrix, and `create_engine`."""

from __future__ import annotations

from typing import Any

from llama_engine import InvalidParamsError, LlamaEngine, ModelSpec
from llama_runtime.backends import available_backends, pick_backend

__all__ = ["available_backends", "create_engine"]

_ENGINE_OPTIONS = {"threads", "progress", "prefill_chunk", "kv_memory", "kv_block_size",
                   "max_batch", "kv_policy", "weights"}
_SPEC_OPTIONS = {"context_length", "dtype"}


def create_engine(
    model: str = "smollm2-135m-instruct",
    *,
    embed_model: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    **options: Any,
) -> LlamaEngine:
    """A ready engine with `model` loaded (a registered name or a path).

    Options: context_length (cap the context), dtype ("auto", "float32", "bfloat16",
    "float16"), threads (torch CPU threads), progress (show a bar on loads over a second),
    prefill_chunk (most tokens in one step's forward), kv_memory (KV cache budget: bytes,
    "2GiB", "30%" of free memory, or "auto" = half the free memory, at most 4 GiB),
    kv_block_size (tokens per KV block, 16), max_batch (requests served per step, 32),
    kv_policy ("wait": a request that does not fit the KV cache waits for room; "fail": it
    fails at once with KVCacheFull), weights ("auto": "quantized" on CPU when the kernels
    compile, else "dequant"; "quantized": GGUF Q4_0/Q4_1/Q8_0 stay quantized in memory and are
    multiplied by a compiled kernel, exact up to summation order; "dequant": every weight
    dequantized to the compute dtype at load).
    """
    unknown = sorted(set(options) - _ENGINE_OPTIONS - _SPEC_OPTIONS)
    if unknown:
        raise InvalidParamsError(
            f"unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(_ENGINE_OPTIONS | _SPEC_OPTIONS))}")
    if embed_model is not None:
        raise InvalidParamsError(
            "embed_model is not supported yet: embeddings are not implemented in this release")
    name = pick_backend(backend)
    spec = ModelSpec(model=model, device=device,
                     **{k: v for k, v in options.items() if k in _SPEC_OPTIONS})
    if name == "torch":
        from llama_runtime.torch_backend import TorchEngine

        engine = TorchEngine(device=device,
                             **{k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
    else:  # pragma: no cover - pick_backend refuses the rest
        raise AssertionError(name)
    engine.load_model(spec)
    return engine
