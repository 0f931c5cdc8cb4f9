"""BERT-family encoders on the kernels without torch: `NumpyOps` implements the encoder half of
llama_models.Ops over numpy arrays (the products through the kernels' float kernel, GELU through
theirs), and `NativeEncoder` runs llama_models.bert's forward, written once against Ops, with
it."""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_models.bert import EncoderFiles
from llama_models.checkpoint import float32
from llama_runtime.backends import physical_cores
from llama_runtime.kernels.api import gelu, linear

__all__ = ["NativeEncoder", "NumpyOps"]


class NumpyOps:
    """The encoder operations of `Ops` on float32 numpy arrays: padded [B, T, ...] activations
    with a [B, T] bool mask (True = a real token)."""

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear_bias(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        lead = x.shape[:-1]
        out = linear(weight, x.reshape(-1, x.shape[-1]), acts="exact")
        out += bias
        return out.reshape(*lead, weight.shape[0])

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   eps: float) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        var = np.square(centred).mean(-1, keepdims=True)
        return centred / np.sqrt(var + np.float32(eps)) * weight + bias

    def gelu(self, x: np.ndarray, approximate: bool = False) -> np.ndarray:
        return gelu(x, approximate=approximate)

    def key_mask(self, mask: np.ndarray) -> np.ndarray | None:
        # added to the scores [B, H, Tq, Tk]: -inf at padded keys; None = no padding
        if bool(mask.all()):
            return None
        return np.where(mask, np.float32(0.0), np.float32(-np.inf))[:, None, None, :]

    def encoder_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          key_mask: np.ndarray | None, scale: float) -> np.ndarray:
        b, t, h, d = q.shape
        qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, D]
        scores = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * np.float32(scale)
        if key_mask is not None:
            scores += key_mask
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        out = np.matmul(scores, vh)  # [B, H, T, D]
        return np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(b, t, h * d)

    def pool(self, x: np.ndarray, mask: np.ndarray, modes: tuple[str, ...]) -> np.ndarray:
        keep = mask[..., None].astype(np.float32)  # [B, T, 1]
        lengths = np.maximum(keep.sum(1), 1.0)  # [B, 1]
        out: list[np.ndarray] = []
        for mode in modes:
            if mode == "cls":
                out.append(x[:, 0])
            elif mode == "max":
                out.append(np.where(mask[..., None], x, -np.inf).max(1))
            elif mode == "mean":
                out.append((x * keep).sum(1) / lengths)
            elif mode == "mean_sqrt_len_tokens":
                out.append((x * keep).sum(1) / np.sqrt(lengths))
            elif mode == "weightedmean":
                w = keep * np.arange(1, x.shape[1] + 1, dtype=np.float32)[None, :, None]
                out.append((x * w).sum(1) / np.maximum(w.sum(1), 1e-9))
            elif mode == "lasttoken":
                last = np.maximum(mask.sum(1), 1) - 1
                out.append(x[np.arange(x.shape[0]), last])
            else:
                raise ValueError(f"unknown pooling mode {mode!r}")
        pooled = out[0] if len(out) == 1 else np.concatenate(out, axis=-1)
        return pooled.astype(np.float32, copy=False)

    def l2_normalize(self, x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.maximum(norm, np.float32(1e-12))


class NativeEncoder:
    """An encoder's weights as float32 numpy arrays and its forward on NumpyOps."""

    backend = "native"
    device = "cpu"

    def __init__(self, files: EncoderFiles, *, threads: int | None = None) -> None:
        from llama_runtime.kernels.library import library

        self._lib = library()
        self._threads = threads or physical_cores()
        weights = {name: np.ascontiguousarray(float32(raw)) for name, raw in
                   files.weights.items()}
        self._model: Any = files.build(weights, NumpyOps())

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self._lib.le_set_threads(self._threads)  # process-wide: set before each forward
        return np.asarray(self._model.embed(ids, mask), dtype=np.float32)
