"""llama_runtime: backends, their capability matrix, and `create_engine`."""

from __future__ import annotations

import logging
from typing import Any

from llama_engine import InvalidParamsError, LlamaEngine, ModelSpec, UnsupportedBackendError
from llama_runtime.backends import (
    available_backends,
    native_may_serve,
    pick_backend,
    torch_installed,
)

__all__ = ["available_backends", "create_engine"]

log = logging.getLogger(__name__)

_ENGINE_OPTIONS = {"threads", "progress", "prefill_chunk", "kv_memory", "kv_block_size",
                   "max_batch", "kv_policy", "weights", "decode", "kv_dtype"}
_SPEC_OPTIONS = {"context_length", "dtype"}


def create_engine(
    model: str | None = "smollm2-135m-instruct",
    *,
    embed_model: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    **options: Any,
) -> LlamaEngine:
    """A ready engine with `model` loaded (a registered name or a path).

    Embeddings: `embed_model` names the sentence encoder `embed()` runs (a registered name such
    as "all-minilm-l6-v2" or a sentence-transformers / HF BERT directory), loaded here; left
    None, "all-minilm-l6-v2" is loaded when `embed()` is first called. embed_model="decoder"
    embeds with `model` itself (mean of its final hidden states, L2-normalized). model=None
    builds an embeddings-only engine (embed_model defaults to "all-minilm-l6-v2"); its
    generating methods raise SessionError.

    Options: context_length (cap the context), dtype ("auto", "float32", "bfloat16", "float16"),
    threads (CPU threads; default: the physical cores), progress (show a bar on loads over a
    second), prefill_chunk (most tokens in one step's forward), kv_memory (KV cache budget:
    bytes, "2GiB", "30%" of free memory, or "auto" = half the free memory, at most 4 GiB),
    kv_block_size (tokens per KV block, 16), max_batch (requests served per step, 32), kv_policy
    ("wait": a prompt that does not fit the KV cache waits for room, and a running request that
    needs a block when none is free preempts the newest one, which resumes later with the same
    tokens; "fail": either fails at once with KVCacheFull), weights ("auto": "quantized" on CPU
    when the kernels compile, else "dequant"; "quantized": GGUF Q4_0/Q4_1/Q8_0 stay quantized in
    memory and are multiplied by a compiled kernel, exact up to summation order; "dequant":
    every weight dequantized to the compute dtype at load), decode (how prompts and generated
    tokens are computed: "auto" = "mixed" on a CPU in float32, else "torch"; "mixed": one native
    call per step, prompt tokens with float activations (their K/V are the float model's) and
    generated tokens with activations quantized to 16-bit integers per 32-block for every
    product with a quantized weight (~0.002% relative error per product), which gives the
    float model's greedy tokens as often as "exact" does, in 1.1x int8's time a decode step
    and ~1.5x int16's a prompt; "int16": 16-bit activations for prompts too (faster prompts;
    on 2 of 123 test prompts a near-tie later flips); "int8": 8 bits for both, llama.cpp's CPU
    scheme, ~0.5% relative error per product, which flips near-tied greedy choices; "exact":
    float activations for both, the reference's arithmetic up to summation order;
    "torch": op by op in torch, the reference path), kv_dtype (the KV cache's dtype: "auto" =
    "float16" beside the int8 kernels on a CPU, as llama.cpp keeps it, else the compute dtype
    (float32 beside the other modes); or "float32", "float16", "bfloat16").
    """
    unknown = sorted(set(options) - _ENGINE_OPTIONS - _SPEC_OPTIONS)
    if unknown:
        raise InvalidParamsError(
            f"unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(_ENGINE_OPTIONS | _SPEC_OPTIONS))}")
    if embed_model is not None and (not isinstance(embed_model, str) or not embed_model):
        raise InvalidParamsError(
            f"embed_model must be a model name or path, got {embed_model!r}")
    if model is None:
        if embed_model == "decoder":
            raise InvalidParamsError(
                "embed_model='decoder' embeds with the generating model, but model=None; pass "
                "model=... or name an embedding model such as 'all-minilm-l6-v2'")
        spec_only = sorted(set(options) & _SPEC_OPTIONS)
        if spec_only:
            raise InvalidParamsError(
                f"{', '.join(spec_only)}: only for a generating model, but model=None; pass "
                "model=... or drop the option")
        embed_model = embed_model or "all-minilm-l6-v2"
    if backend == "auto" and model is not None and native_may_serve(device, options):
        from llama_runtime.native.engine import NativeEngine

        try:
            native = NativeEngine(device=device, embed_model=embed_model,
                                  **{k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
            native.load_model(ModelSpec(model=model, device=device, **{
                k: v for k, v in options.items() if k in _SPEC_OPTIONS}))
        except UnsupportedBackendError as e:  # a model or machine it cannot run: torch can
            if not torch_installed():
                raise UnsupportedBackendError(
                    f"{e}. The torch backend runs it, but torch is not installed: pip install "
                    "'llama-engine[torch]'") from e
            log.warning("the native backend does not serve %s (%s); using torch, op by op "
                        "where its fused step cannot run the model either", model, e)
        else:
            if embed_model is not None:
                native.load_embed_model(embed_model)
            return native
    name = pick_backend(backend)
    if name == "torch":
        from llama_runtime.torch_backend import TorchEngine

        engine = TorchEngine(device=device, embed_model=embed_model,
                             **{k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
    elif name == "native":
        from llama_runtime.native.engine import NativeEngine

        engine = NativeEngine(device=device, embed_model=embed_model,
                              **{k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
    else:  # pragma: no cover - pick_backend refuses the rest
        raise AssertionError(name)
    if model is not None:
        engine.load_model(ModelSpec(model=model, device=device,
                                    **{k: v for k, v in options.items() if k in _SPEC_OPTIONS}))
    if embed_model is not None:
        engine.load_embed_model(embed_model)
    return engine
