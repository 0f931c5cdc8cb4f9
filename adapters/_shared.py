"""What every adapter class shares: one engine per model in the process, and strict keywords.

`shared_engine` is a small process-wide registry. Adapters built from a model name
(`ChatLlamaEngine(model=...)`, `LlamaEngineEmbeddings(model=...)`, ...) ask it for an engine
instead of loading a private copy, so two chat models over the same model hold one set of
weights and one KV cache, and the engine's scheduler batches their requests together. The key is
(model, embed_model, backend, device, the other `create_engine` options); an adapter given
`engine=` uses that engine and never touches the registry.

Lifetime: the registry holds engines *weakly*. An engine lives as long as something holds it
(an adapter, a user's variable); when the last holder goes, the engine is collected (its model
thread stops, its memory is freed) and the next adapter for that key loads a fresh one. This
keeps the registry from pinning hundreds of MB for a model nobody uses any more; a caller who
wants a model to stay loaded between short-lived adapters keeps a reference to `adapter.engine`
(or builds the engine with `create_engine` and passes `engine=`). Engines are thread-safe, so a
shared one may serve adapters on many threads; loads of one key are serialized (two threads
asking at once get one engine), loads of different keys run in parallel.

`check_keywords` is how each adapter refuses a keyword it does not know (a misspelt
`temprature=` would otherwise be dropped silently and the request sampled at the default).
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import weakref
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from llama_engine import InvalidParamsError, LlamaEngine, SamplingParams

__all__ = [
    "DEFAULT_EMBED_MODEL",
    "DEFAULT_MODEL",
    "SAMPLING_FIELDS",
    "adapter_keywords",
    "check_engine_options",
    "check_keywords",
    "shared_engine",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"

_Key = tuple[str | None, str | None, str, str, tuple[tuple[str, Hashable], ...]]

_engines: weakref.WeakValueDictionary[_Key, LlamaEngine] = weakref.WeakValueDictionary()
_key_locks: dict[_Key, threading.Lock] = {}
_registry_lock = threading.Lock()


def shared_engine(
    model: str | None,
    *,
    embed_model: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> LlamaEngine:
    """The process's engine for `model` (None: embeddings only) and `embed_model`, built with
    `llama_runtime.create_engine(model, embed_model=..., **options)` on first use.

    `options` are `create_engine` keywords (backend, device, threads, kv_memory, ...); their
    values must be plain hashable values (str, int, float, bool, None). Errors from
    `create_engine` (unknown model, unknown option) propagate as they are.
    """
    options = dict(options or {})
    for name in ("model", "embed_model"):
        if name in options:
            raise InvalidParamsError(
                f"engine_options holds {name}={options[name]!r}; name the model with the "
                "adapter's own model= keyword instead")
    for name, value in options.items():
        try:
            hash(value)
        except TypeError:
            raise InvalidParamsError(
                f"engine option {name}={value!r} is not a plain value; pass a str, int, float "
                "or bool, or build the engine yourself with create_engine and pass engine="
            ) from None
    backend = str(options.pop("backend", "auto"))
    device = str(options.pop("device", "auto"))
    key: _Key = (model, embed_model, backend, device, tuple(sorted(options.items())))
    with _registry_lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine
        lock = _key_locks.setdefault(key, threading.Lock())
    try:
        with lock:  # one load per key; other keys load in parallel
            engine = _engines.get(key)
            if engine is None:
                from llama_runtime import create_engine

                engine = create_engine(model, embed_model=embed_model, backend=backend,
                                       device=device, **options)
                _engines[key] = engine
            return engine
    finally:
        with _registry_lock:
            if _key_locks.get(key) is lock:
                del _key_locks[key]


def check_keywords(
    owner: str, given: Iterable[str], allowed: Iterable[str], *,
    noun: str = "keyword argument(s)",
) -> None:
    """Raise InvalidParamsError naming the keywords in `given` that `owner` does not take,
    the closest allowed name for each, and all allowed names."""
    allowed = sorted(set(allowed))
    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, allowed, n=1)
        named.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise InvalidParamsError(
        f"unknown {owner} {noun} {', '.join(named)}; allowed: {', '.join(allowed)}")


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
"""Every `SamplingParams` field: each may be given to a generating adapter as a keyword."""


def adapter_keywords(
    owner: str, data: Mapping[str, Any], fields: Iterable[str], *, sampling: bool
) -> dict[str, Any]:
    """The keywords of an adapter's constructor, checked: an unknown one raises
    InvalidParamsError listing the allowed ones. With `sampling`, the class also takes every
    `SamplingParams` field: one that is not a declared field moves into the `sampling` dict."""
    fields = set(fields)
    out = dict(data)
    check_keywords(owner, out, fields | SAMPLING_FIELDS if sampling else fields)
    if not sampling:
        return out
    moved = {k: out.pop(k) for k in sorted(set(out) - fields)}
    if moved:
        given = out.get("sampling") or {}
        if not isinstance(given, Mapping):
            raise InvalidParamsError(
                f"{owner}: sampling must be a dict of SamplingParams fields, got {given!r}")
        twice = sorted(set(moved) & set(given))
        if twice:
            raise InvalidParamsError(
                f"{owner} got {', '.join(twice)} both as a keyword and in sampling=; give each "
                "once")
        out["sampling"] = {**given, **moved}
    return out


def check_engine_options(owner: str, engine: LlamaEngine | None, options: Mapping[str, Any]
                         ) -> None:
    """engine_options only mean something when the adapter builds its engine."""
    if engine is not None and options:
        raise InvalidParamsError(
            f"{owner} was given engine= and engine_options={dict(options)!r}; engine_options "
            "apply only when the engine is built from model=; drop one of them")
