"""llama_models: model files in, a runnable architecture out.

`open_model(name_or_path)` reads a checkpoint, picks the architecture, parses its config and
returns the raw (still quantized) weights; a backend then prepares those weights and builds the
architecture's model with its own `Ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_engine.errors import UnsupportedArchitectureError
from llama_models import bert, gemma3, llama, phi3, qwen2, qwen3
from llama_models.bert import EncoderFiles, open_encoder
from llama_models.checkpoint import Checkpoint, RawTensor, read_checkpoint, typed_errors
from llama_models.decoder import DecoderConfig, DecoderModel, open_decoder
from llama_models.ops import Ops, RopeSpec
from llama_models.registry import KNOWN_MODELS, resolve_model_path

__all__ = [
    "FAMILIES",
    "KNOWN_MODELS",
    "Checkpoint",
    "DecoderConfig",
    "EncoderFiles",
    "ModelFiles",
    "Ops",
    "RawTensor",
    "RopeSpec",
    "open_encoder",
    "open_model",
    "read_checkpoint",
    "resolve_model_path",
]

FAMILIES = (llama, qwen2, qwen3, gemma3, phi3)
"""The generating families, one module each (see llama_models/decoder.py and docs/models.md)."""

# architecture name (GGUF general.architecture or HF model_type) -> module with the family
_ARCHITECTURES: dict[tuple[str, str], Any] = {
    **{("gguf", a): f for f in FAMILIES for a in f.GGUF_ARCHITECTURES},
    **{("hf", a): f for f in FAMILIES for a in f.HF_ARCHITECTURES},
}


@dataclass(kw_only=True)
class ModelFiles:
    """A checkpoint matched to its architecture: config, RoPE and named raw weights."""

    name: str
    checkpoint: Checkpoint
    family: Any
    config: DecoderConfig
    rope: RopeSpec
    weights: dict[str, RawTensor]

    def build(self, prepared: dict[str, Any], ops: Ops) -> DecoderModel:
        return DecoderModel(self.config, self.rope, prepared, ops)


def open_model(model: str) -> ModelFiles:
    """Resolve a registered name or path, read it, and check it against its architecture.
    Every failure is a `LlamaError`."""
    with typed_errors(f"model {model!r}"):
        return _open_model(model)


def _open_model(model: str) -> ModelFiles:
    path = resolve_model_path(model)
    ckpt = read_checkpoint(path)
    family = _ARCHITECTURES.get((ckpt.format, ckpt.architecture))
    if family is None and ckpt.architecture in bert.HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{model!r} is an embedding (encoder) model, not one that generates; load it with "
            f"create_engine(model=None, embed_model={model!r}), or pass it as embed_model= "
            "beside a generating model")
    if family is None:
        supported = sorted({a for _, a in _ARCHITECTURES})
        raise UnsupportedArchitectureError(
            f"{path} is a {ckpt.architecture!r} model; llama-engine runs {', '.join(supported)} "
            "architectures so far. Use a model of a supported family")
    config, rope, weights = open_decoder(ckpt, family)
    return ModelFiles(name=model, checkpoint=ckpt, family=family, config=config, rope=rope,
                      weights=weights)
