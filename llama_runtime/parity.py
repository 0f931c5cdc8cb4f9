"""The parity gate: a backend against the reference (reference.py: float32, op by op, on the
CPU) on fixed prompts, and the reference against transformers.

A backend passes for a model on a device when, on the `PROMPTS`:
- its logits after each prompt are within `tolerance(dtype, arithmetic)` of the reference's
  (the largest absolute difference over the vocabulary), and
- its `N_TOKENS` greedy tokens equal the reference's on at least `MIN_EQUAL` prompts. A prompt
  whose tokens part where the reference's own choice was a near-tie (its logit for our token
  within twice the tolerance of its best) counts as equal: no arithmetic but the reference's
  own, in its own order, can be expected to break such a tie the same way.

Results are cached as JSON under `cache_dir()/parity`, keyed by the model's fingerprint, the
backend, its version (the engine's, and MLX's, torch's or the kernels' sources), the device and
the arithmetic, with the backend's measured decode speed on those prompts (the probe `auto`
ranks proven backends by: docs/architecture.md).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_engine import LlamaError, ParityError

__all__ = [
    "MIN_EQUAL",
    "N_TOKENS",
    "PROMPTS",
    "REFERENCE_TOLERANCE",
    "ParityError",
    "ParityResult",
    "arithmetic_of",
    "cache_dir",
    "cached_result",
    "cached_results",
    "check_reference",
    "model_key",
    "reference_for",
    "result_path",
    "run_gate",
    "tolerance",
]

log = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
    "1, 2, 3, 5, 8, 13,",
    "Les mathématiques sont",
)
N_TOKENS = 32
MIN_EQUAL = 5
REFERENCE_TOLERANCE = 1e-3
"""How far the reference's logits may be from transformers' float32 ones (summation order)."""

_TOLERANCE = {"float32": 1e-2, "float16": 0.25, "bfloat16": 0.5}
"""Logit tolerance by compute dtype, for float arithmetic."""
_ARITHMETIC = {"int16": 0.05, "int8": 1.0}
"""...and for activations quantized to integers (the native kernels' int16 and int8 modes;
"mixed" computes prompts in float, so its logits after a prompt are float ones)."""


def tolerance(dtype: str, arithmetic: str) -> float:
    return max(_TOLERANCE.get(dtype, 0.5), _ARITHMETIC.get(arithmetic, 0.0))


@dataclass(frozen=True, kw_only=True)
class ParityResult:
    model: str
    fingerprint: str
    backend: str
    device: str
    dtype: str
    arithmetic: str
    """The engine's decode mode ("mixed", "int8", "torch", "mlx", ...)."""
    kv_dtype: str
    version: str
    passed: bool
    max_logit_error: float
    tolerance: float
    prompts_equal: int
    prompts: int
    decode_tok_s: float
    """The probe: the median decode speed over the gate's generations."""
    reason: str = ""
    reference_vs_transformers: float | None = None
    """The reference's largest logit difference from transformers' float32 forward, when
    checked (`llama-engine parity` does when transformers is installed)."""
    prompt_details: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key_arithmetic(self) -> str:
        return _arithmetic_key(self.arithmetic, self.dtype, self.kv_dtype)


def _arithmetic_key(decode: str, dtype: str, kv_dtype: str) -> str:
    """What sets a backend's numbers besides its version: "mixed.float32.float32"."""
    return f"{decode}.{dtype}.{kv_dtype}"


def cache_dir() -> Path:
    """$LLAMA_ENGINE_CACHE, else $XDG_CACHE_HOME/llama-engine, else ~/.cache/llama-engine."""
    env = os.environ.get("LLAMA_ENGINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama-engine"


def backend_version(backend: str) -> str:
    """What the backend's numbers depend on: the engine's version and Python sources, and its
    own library's version (or the kernels' sources)."""
    parts = [f"llama-engine {_version('llama-engine')} ({_code_hash()})"]
    if backend == "mlx":
        parts.append(f"mlx {_version('mlx')}")
    elif backend == "torch":
        parts.append(f"torch {_version('torch')}")
    if backend in ("native", "torch"):
        from llama_runtime.kernels.library import sources_hash

        parts.append(f"kernels {sources_hash()[:12]}")
    return ", ".join(parts)


@functools.cache
def _code_hash() -> str:
    """The Python sources the numbers come from (a development checkout changes them without
    a version bump)."""
    h = hashlib.sha256()
    for package in ("llama_models", "llama_runtime"):
        root = Path(importlib.util.find_spec(package).origin).parent  # type: ignore[union-attr]
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _key(fingerprint: str, backend: str, device: str, arithmetic: str) -> Path:
    """`arithmetic`: what sets the numbers besides the backend (see `arithmetic_of`)."""
    version = hashlib.sha256(backend_version(backend).encode()).hexdigest()[:12]
    return cache_dir() / "parity" / f"{fingerprint}-{backend}-{device}-{arithmetic}-{version}.json"


def arithmetic_of(engine: Any) -> str:
    """An engine's arithmetic as a result's key names it: its decode mode, compute dtype and
    K/V dtype ("mixed.float32.float32")."""
    return _arithmetic_key(engine.decode_kernel, engine.model.dtype, engine.stats()["kv_dtype"])


def cached_result(fingerprint: str, backend: str, device: str,
                  arithmetic: str) -> ParityResult | None:
    path = _key(fingerprint, backend, device.split(":")[0], arithmetic)
    try:
        return ParityResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def cached_results(key: str, backend: str, device: str) -> list[ParityResult]:
    """Every cached result for this model and backend at its current version, on `device`
    ("auto": any; "cuda:1" counts as "cuda")."""
    version, kind = backend_version(backend), device.split(":")[0]
    out = []
    for path in (cache_dir() / "parity").glob(f"{key}-{backend}-*.json"):
        try:
            r = ParityResult(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if r.version == version and kind in ("auto", r.device):
            out.append(r)
    return out


def result_path(result: ParityResult) -> Path:
    """Where the cache keeps `result`."""
    return _key(result.fingerprint, result.backend, result.device, result.key_arithmetic)


def _store(result: ParityResult) -> None:
    path = result_path(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.as_dict(), indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home: the result still stands for this run
        log.warning("could not cache the parity result in %s: %s", path.parent, e)


_SAMPLES, _SAMPLE_BYTES = 32, 1 << 16


def model_key(files: Any) -> str:
    """Names the weights a result is for: the model's configuration, and each weight file's
    size and 32 slices of 64 KiB spread over it (2 MiB read a file: another fine-tune or
    quantization of the same architecture differs there, while hashing whole files would cost
    seconds a load)."""
    ckpt = files.checkpoint
    path = Path(ckpt.path)
    shards = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    h = hashlib.sha256(repr(files.config).encode())
    for shard in shards:
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return f"{ckpt.architecture}-{h.hexdigest()[:16]}"


def reference_for(files: Any, prompts: list[list[int]], context: int,
                  key: str | None = None) -> Any:
    """The reference's run on the gate's prompts (a ReferenceRun) for an engine of `context`
    positions, cached per model (`key`: its model_key, when already known)."""
    from llama_runtime.reference import reference_run

    version = hashlib.sha256(
        f"{_code_hash()}:{prompts}:{N_TOKENS}:{files.rope.for_context(context)!r}".encode()
    ).hexdigest()[:12]
    path = cache_dir() / "parity" / f"{key or model_key(files)}-reference-{version}.npz"
    if not path.exists():
        from llama_runtime.loading import host_available_memory

        need, free = 4 * files.checkpoint.n_params, host_available_memory()
        if need > free * 0.8:
            raise ParityError(
                f"the parity gate needs the model's float32 reference, {need / 2**30:.1f} GiB, "
                f"and {free / 2**30:.1f} GiB is available; choose a backend by name (a named "
                "backend is not gated), or run `llama-engine parity` where memory allows")
    try:
        return reference_run(str(files.checkpoint.path), prompts, N_TOKENS, path,
                             context=context)
    except (RuntimeError, OSError) as e:
        raise ParityError(f"{e}; the parity gate needs the model's float32 reference (4 bytes "
                          "a parameter in memory): free memory, or choose a backend by "
                          "name") from e


def run_gate(engine: Any, files: Any, *,
             reference_vs_transformers: float | None = None) -> ParityResult:
    """Gate the engine's backend on its loaded model (`files`: its ModelFiles); caches and
    returns the result. Runs on the engine itself: its six requests count in its statistics,
    and their prompts' blocks stay in its prefix cache until evicted. A gate that cannot run
    on this engine (its context or KV budget too small, say) is a ParityError."""
    from llama_runtime.bench import prompt_logits

    handle = engine.model
    prompts = [engine.tokenize(p) for p in PROMPTS]
    key = model_key(files)
    reference = reference_for(files, prompts, handle.context_length, key)
    arithmetic = engine.decode_kernel
    tol = tolerance(handle.dtype, arithmetic)
    details: list[dict[str, Any]] = []
    worst, equal, speeds = 0.0, 0, []
    try:
        for i, ids in enumerate(prompts):
            error = float(np.abs(prompt_logits(engine, ids) - reference.first[i]).max())
            done = engine.generate(ids, max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
            got = done.token_ids
            speeds.append(done.usage.decode_tok_s)
            want = reference.tokens[i].tolist()[:len(got)]  # a short context may stop it early
            parted = next((j for j, (a, b) in enumerate(zip(got, want, strict=True))
                           if a != b), None)
            margin = None if parted is None else reference.margin(i, parted, got[parted])
            same = parted is None or (margin is not None and margin <= 2 * tol)
            equal += same
            worst = max(worst, error)
            details.append({"prompt_tokens": len(ids), "tokens_compared": len(got),
                            "max_logit_error": error, "first_difference": parted,
                            "reference_margin": margin, "equal": same})
    except LlamaError as e:
        raise ParityError(
            f"the parity gate could not run on this engine ({type(e).__name__}: {e}); load the "
            "model once with the default context and KV budget, or run `llama-engine parity "
            f"{handle.name}`, then load it as you like (the result is cached)") from e
    passed = worst <= tol and equal >= MIN_EQUAL
    reason = "" if passed else (
        f"logits {worst:.3g} from the reference (tolerance {tol:g})" if worst > tol else
        f"greedy tokens equal on {equal} of {len(prompts)} prompts (at least {MIN_EQUAL})")
    result = ParityResult(
        model=handle.name, fingerprint=key,
        backend=handle.backend, device=handle.device.split(":")[0], dtype=handle.dtype,
        arithmetic=arithmetic, kv_dtype=engine.stats()["kv_dtype"],
        version=backend_version(handle.backend), passed=passed,
        max_logit_error=worst, tolerance=tol, prompts_equal=equal, prompts=len(prompts),
        decode_tok_s=float(statistics.median(speeds)), reason=reason,
        reference_vs_transformers=reference_vs_transformers, prompt_details=details)
    _store(result)
    return result


def check_reference(files: Any, prompts: list[list[int]]) -> float | None:
    """The reference's largest logit difference from transformers' float32 forward after each
    of the gate's prompts, or None when transformers (and torch) are not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    path = Path(files.checkpoint.path)
    started = time.perf_counter()
    try:
        if path.is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # transformers' own errors: an architecture or file it cannot read
        raise ParityError(f"transformers could not load {path} to check the reference "
                          f"({type(e).__name__}: {e}); pass --no-transformers") from e
    worst = 0.0
    with torch.inference_mode():
        reference = reference_for(files, prompts, files.config.context_length)
        for ids, first in zip(prompts, reference.first, strict=True):
            theirs = model(torch.tensor([ids])).logits[0, -1].float().numpy()
            worst = max(worst, float(np.abs(theirs - first).max()))
    log.info("reference against transformers: %.3g (%.1f s)", worst,
             time.perf_counter() - started)
    return worst
