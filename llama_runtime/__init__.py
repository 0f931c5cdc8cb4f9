"""llama_runtime: backends, their capability matrix, and `create_engine`."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from llama_engine import InvalidParamsError, LlamaEngine, ModelSpec, UnsupportedBackendError
from llama_runtime.backend import BackendEntry, check_options, entries, entry, fits
from llama_runtime.backends import (
    METAL_DEVICES,
    available_backends,
    check_threads,
    pick_backend,
    torch_installed,
)
from llama_runtime.engine import Engine

__all__ = ["Engine", "available_backends", "create_engine"]

log = logging.getLogger(__name__)

_ENGINE_OPTIONS = {"progress", "prefill_chunk", "kv_memory", "kv_block_size", "max_batch",
                   "kv_policy"}
_BACKEND_OPTIONS = {"threads", "weights", "decode", "kv_dtype"}
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
    known = _ENGINE_OPTIONS | _BACKEND_OPTIONS | _SPEC_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidParamsError(
            f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
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
    check_threads(options.get("threads"))
    backend_options = {k: v for k, v in options.items() if k in _BACKEND_OPTIONS}
    engine_options = {k: v for k, v in options.items() if k in _ENGINE_OPTIONS}
    spec = None if model is None else ModelSpec(
        model=model, device=device, **{k: v for k, v in options.items() if k in _SPEC_OPTIONS})
    if backend == "auto":
        # in auto's order; a backend's probe runs only when it is reached (torch's imports it)
        candidates = [e for e in entries() if e.serves(device) and fits(e, options)]
    else:
        pick_backend(backend)  # registered and available here, or a typed error saying why
        chosen = entry(backend)
        assert chosen is not None
        check_options(chosen, options)
        candidates = [chosen]
    if spec is not None:
        return _gated(candidates, spec, embed_model, device, backend == "auto",
                      backend_options, engine_options, options)
    refusal: UnsupportedBackendError | None = None
    for e in candidates:
        if backend == "auto" and not _eligible(e):
            continue
        try:
            return _build(e, spec, embed_model, device, backend_options, engine_options)
        except UnsupportedBackendError as err:  # a machine it cannot run: try the next
            if backend != "auto":
                raise
            refusal = err
    _refuse(refusal, model, device, options)


def _gated(candidates: list[BackendEntry], spec: ModelSpec, embed_model: str | None,
           device: str, auto: bool, backend_options: dict[str, Any],
           engine_options: dict[str, Any], options: dict[str, Any]) -> Engine:
    """A generating model's engine on the first candidate that loads it and whose parity
    result for it (cached, or run now: parity.py) passes. `auto`: the candidates are ranked by
    the rule of docs/architecture.md and a failed one is passed over; else the one candidate
    was asked for by name, and a cached failure of it is an error."""
    from llama_engine import ParityError
    from llama_models import open_model
    from llama_runtime.parity import arithmetic_of, cached_result, model_key, run_gate

    files = open_model(spec.model)
    key = model_key(files)
    if auto:
        candidates = _ranked(candidates, key, device)
    refusal: UnsupportedBackendError | None = None
    failed: list[str] = []
    for e in candidates:
        if auto and not _eligible(e):  # probed only when reached (torch's imports torch)
            continue
        try:
            engine = _build(e, spec, None, device, backend_options, engine_options, files)
        except UnsupportedBackendError as err:  # a model or machine it cannot run: the next
            if not auto:
                raise
            refusal = err
            log.warning("the %s backend does not serve %s (%s); trying the next backend",
                        e.name, spec.model, err)
            continue
        try:
            result = cached_result(key, e.name, engine.model.device, arithmetic_of(engine))
            if result is None and auto:
                _note(engine_options, f"checking the {e.name} backend against the float32 "
                      f"reference on {spec.model} (once: the result is cached)")
                result = run_gate(engine, files)
            if result is not None and not result.passed:
                why = (f"the {e.name} backend failed the parity gate for {spec.model} on "
                       f"{result.device} ({result.arithmetic}, {result.dtype}): {result.reason}")
                if not auto:
                    raise ParityError(
                        f"{why}; choose backend='auto' (it picks a backend that passed), another "
                        f"backend or decode mode, or rerun `llama-engine parity {spec.model} "
                        f"--backend {e.name}` after an upgrade (it replaces the cached result)")
                log.warning("%s; trying the next backend", why)
                failed.append(f"{e.name}: {result.reason}")
                engine.close()
                continue
        except BaseException:
            engine.close()
            raise
        return _with_embedder(engine, embed_model)
    if failed:
        raise ParityError(
            f"no backend here passed the parity gate for {spec.model} ({'; '.join(failed)}); "
            f"`llama-engine parity {spec.model}` shows the details")
    _refuse(refusal, spec.model, device, options)


PROBE_MARGIN = 1.15
"""A proven backend outranks one earlier in the registry only when its probe is this much
faster (the probe's own spread is ~15% here)."""


def _ranked(candidates: list[BackendEntry], key: str, device: str) -> list[BackendEntry]:
    """auto's order (docs/architecture.md): backends proven on this model and device first
    (the fastest by its measured probe when it beats the earlier ones by PROBE_MARGIN, then
    registry order); then the unproven ones, those that run an accelerator present here
    (Metal, CUDA) before the others, each group in registry order. A backend whose every cached
    result here failed is left out (it would be loaded only to be refused)."""
    from llama_runtime.parity import cached_results

    proven: list[tuple[BackendEntry, float]] = []
    unproven: list[BackendEntry] = []
    for e in sorted(candidates, key=lambda e: e.order):
        results = cached_results(key, e.name, device)
        passed = [r.decode_tok_s for r in results if r.passed]
        if passed:
            proven.append((e, max(passed)))
        elif not results:
            unproven.append(e)
    if proven:
        best = proven[0]
        for p in proven[1:]:
            if p[1] > best[1] * PROBE_MARGIN:
                best = p
        proven.remove(best)
        proven.insert(0, best)
    unproven.sort(key=lambda e: (not (device != "cpu" and e.accelerated()), e.order))
    return [e for e, _ in proven] + unproven


def _note(engine_options: dict[str, Any], text: str) -> None:
    log.info("%s", text)
    if engine_options.get("progress", True):
        import sys

        print(f"{text} ...", file=sys.stderr, flush=True)


def _refuse(refusal: UnsupportedBackendError | None, model: str | None, device: str,
            options: dict[str, Any]) -> NoReturn:
    """Raise the typed error that says why no backend runs this (and what to install)."""
    if refusal is None:  # nothing here runs this device with these options
        serving = [e for e in entries() if e.serves(device) and _eligible(e)]
        if serving:  # an option value none of them takes: say which values the last takes
            try:
                check_options(serving[-1], options)
            except InvalidParamsError as e:
                if torch_installed():
                    raise
                raise UnsupportedBackendError(
                    f"{e}; the torch backend is not installed: pip install "
                    "'llama-engine[torch]'") from e
        if device in METAL_DEVICES:
            raise UnsupportedBackendError(
                f"device={device!r} is MLX on Metal: it needs a Mac with Apple silicon and pip "
                "install 'llama-engine[mlx]'; here, use device='cpu' or 'auto'")
        raise UnsupportedBackendError(
            f"no backend here runs device={device!r} with these options; `llama-engine info "
            "--backends` lists what each can do (torch: pip install 'llama-engine[torch]')")
    if not torch_installed():
        raise UnsupportedBackendError(
            f"{refusal}. The torch backend runs it, but torch is not installed: pip install "
            "'llama-engine[torch]'") from refusal
    raise refusal


def _eligible(e: BackendEntry) -> bool:
    info = e.info()
    return info.available and info.default_eligible


def _build(e: BackendEntry, spec: ModelSpec | None, embed_model: str | None, device: str,
           backend_options: dict[str, Any], engine_options: dict[str, Any],
           files: Any = None) -> Engine:
    engine = Engine(e.factory(device=device, **backend_options), embed_model=embed_model,
                    **engine_options)
    try:
        if spec is not None:
            engine.load_model(spec, files=files)
    except BaseException:
        engine.close()
        raise
    return _with_embedder(engine, embed_model)


def _with_embedder(engine: Engine, embed_model: str | None) -> Engine:
    """The engine with its sentence encoder loaded (closed if that fails)."""
    try:
        if embed_model is not None:
            engine.load_embed_model(embed_model)
    except BaseException:
        engine.close()
        raise
    return engine
