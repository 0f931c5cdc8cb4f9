"""The typed error hierarchy of llama-engine.

Every error a caller can cause is a `LlamaError`; its message says what was wrong, the offending
value, and what to do next. Errors that are also a caller's `ValueError` (bad parameters, bad ids)
inherit from it too, so `except ValueError` keeps working for code that does not know ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "ConfigError",
    "ContextOverflowError",
    "EngineClosedError",
    "GenerationError",
    "InvalidParamsError",
    "InvalidTokenError",
    "KVCacheFull",
    "LlamaError",
    "ModelNotFoundError",
    "OutOfKVMemoryError",
    "ParityError",
    "SessionError",
    "UnsupportedArchitectureError",
    "UnsupportedBackendError",
    "UnsupportedOperationError",
    "UnsupportedQuantizationError",
    "WeightLoadError",
    "file_read_errors",
]


class LlamaError(Exception):
    """Base class of every error llama-engine raises on purpose."""


class ModelNotFoundError(LlamaError):
    """A model name is unknown, its package is not installed, or its path does not exist."""


class WeightLoadError(LlamaError):
    """A model file exists but cannot be read: not a GGUF, truncated, corrupt, shapes wrong."""


class ConfigError(WeightLoadError):
    """A model's configuration is missing a key or holds an impossible value."""


class UnsupportedArchitectureError(LlamaError):
    """The model's architecture has no implementation here."""


class UnsupportedQuantizationError(LlamaError):
    """A tensor is stored in a quantization type this engine cannot read."""


class UnsupportedBackendError(LlamaError):
    """The requested backend or device is not available on this machine."""


class ParityError(UnsupportedBackendError):
    """A backend failed the parity gate for this model (its logits or greedy tokens are not the
    float32 reference's), or the gate could not run; backend="auto" never picks it."""


class UnsupportedOperationError(LlamaError):
    """The loaded model or engine cannot do what was asked (e.g. embed with no embedder)."""


class InvalidParamsError(LlamaError, ValueError):
    """A sampling or request parameter is out of range, of the wrong type, or unknown."""


class InvalidTokenError(LlamaError, ValueError):
    """A token id is outside the model's vocabulary."""


class ContextOverflowError(LlamaError, ValueError):
    """The prompt plus what must be generated does not fit in the model's context."""


class SessionError(LlamaError):
    """A session is closed, unknown, or used by two requests at once."""


class EngineClosedError(SessionError):
    """The engine was closed: it serves nothing more (create a new one)."""


class GenerationError(LlamaError):
    """A request failed for a reason of its own while it was being served (the message says
    which stage); other requests are unaffected."""


class OutOfKVMemoryError(LlamaError):
    """The KV cache has no room left for a session, even after evicting cached blocks."""


# The name the KV-cache issue uses; one class, two spellings.
KVCacheFull = OutOfKVMemoryError


@contextlib.contextmanager
def file_read_errors(what: str, *, fix: str) -> Iterator[None]:
    """Let `LlamaError`s through and turn anything else raised inside (a KeyError from a
    malformed field, a RecursionError, a MemoryError, a Rust panic from `safetensors` or
    `tokenizers`) into a `WeightLoadError` saying `what` could not be read and `fix`, with the
    original as its cause: a malformed file must never surface as an untyped error."""
    try:
        yield
    except LlamaError:
        raise
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise WeightLoadError(f"{what} could not be read ({type(e).__name__}: {e}); {fix}") from e
