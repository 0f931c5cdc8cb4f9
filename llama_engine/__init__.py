"""llama_engine: the narrow waist. Pure Python: importing it never imports torch or mlx."""

from llama_engine.engine import ChatMessage, LlamaEngine
from llama_engine.errors import (
    ConfigError,
    ContextOverflowError,
    EngineClosedError,
    GenerationError,
    InvalidParamsError,
    InvalidTokenError,
    KVCacheFull,
    LlamaError,
    ModelNotFoundError,
    OutOfKVMemoryError,
    ParityError,
    SessionError,
    UnsupportedArchitectureError,
    UnsupportedBackendError,
    UnsupportedOperationError,
    UnsupportedQuantizationError,
    WeightLoadError,
)
from llama_engine.messages import check_messages
from llama_engine.params import SamplingParams
from llama_engine.stream import TokenStream
from llama_engine.types import (
    Completion,
    FinishReason,
    ModelHandle,
    ModelSpec,
    PrefillResult,
    Session,
    StreamChunk,
    Usage,
)

__all__ = [
    "ChatMessage",
    "Completion",
    "ConfigError",
    "ContextOverflowError",
    "EngineClosedError",
    "FinishReason",
    "GenerationError",
    "InvalidParamsError",
    "InvalidTokenError",
    "KVCacheFull",
    "LlamaEngine",
    "LlamaError",
    "ModelHandle",
    "ModelNotFoundError",
    "ModelSpec",
    "OutOfKVMemoryError",
    "ParityError",
    "PrefillResult",
    "SamplingParams",
    "Session",
    "SessionError",
    "StreamChunk",
    "TokenStream",
    "UnsupportedArchitectureError",
    "UnsupportedBackendError",
    "UnsupportedOperationError",
    "UnsupportedQuantizationError",
    "Usage",
    "WeightLoadError",
    "check_messages",
]
