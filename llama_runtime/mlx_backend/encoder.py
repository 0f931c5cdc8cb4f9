"""BERT-family sentence encoders on MLX: llama_models.bert's forward, written once against Ops,
over `MLXOps` (llama_runtime.embedder.SentenceEmbedder runs it beside the MLX backend, or when
asked for backend="mlx")."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from llama_models.bert import EncoderFiles
from llama_runtime.mlx_backend.backend import DTYPES, mlx_device, mlx_stream
from llama_runtime.mlx_backend.ops import MLXOps
from llama_runtime.mlx_backend.weights import float_array

__all__ = ["MLXEncoder"]


class MLXEncoder:
    backend = "mlx"

    def __init__(self, files: EncoderFiles, *, device: str = "auto",
                 dtype: str = "float32") -> None:
        self.device = mlx_device(device)
        self._stream = mlx_stream(self.device)
        with mx.stream(self._stream):
            weights = {name: float_array(raw, DTYPES[dtype]) for name, raw in
                       files.weights.items()}
            mx.eval(list(weights.values()))
            self._model: Any = files.build(weights, MLXOps(DTYPES[dtype]))

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with mx.stream(self._stream):
            out = self._model.embed(mx.array(ids.astype(np.int32)), mx.array(mask))
            return np.array(out.astype(mx.float32))
