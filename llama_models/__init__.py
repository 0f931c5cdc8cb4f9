"""llama_models: model files in, a runnable architecture out.

`open_model(name_or_path)` reads a checkpoint, picks the architecture, parses its config and
returns the raw (still quantized) weights; a backend then prepares those weights and builds the
architecture's model with its own `Ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_engine.errors import UnsupportedArchitectureError
from llama_models import bert, llama
from llama_models.bert import EncoderFiles, open_encoder
from llama_models.checkpoint import Checkpoint, RawTensor, read_checkpoint, typed_errors
from llama_models.ops import Ops, RopeSpec
from llama_models.registry import KNOWN_MODELS, resolve_model_path

__all__ = [
    "KNOWN_MODELS",
    "Checkpoint",
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

# architecture name (GGUF general.architecture or HF model_type) -> module with the family
_ARCHITECTURES: dict[tuple[str, str], Any] = {
    **{("gguf", a): llama for a in llama.GGUF_ARCHITECTURES},
    **{("hf", a): llama for a in llama.HF_ARCHITECTURES},
}


@dataclass(kw_only=True)
class ModelFiles:
    """A checkpoint matched to its architecture: config, RoPE and named raw weights."""

    name: str
    checkpoint: Checkpoint
    family: Any
    config: llama.LlamaConfig
    rope: RopeSpec
    weights: dict[str, RawTensor]

    def build(self, prepared: dict[str, Any], ops: Ops) -> llama.LlamaModel:
        return self.family.LlamaModel(self.config, self.rope, prepared, ops)


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
    config = family.config_from_checkpoint(ckpt)
    return ModelFiles(
        name=model,
        checkpoint=ckpt,
        family=family,
        config=config,
        rope=family.rope_spec(config, ckpt),
        weights=family.load_weights(ckpt, config),
    )
