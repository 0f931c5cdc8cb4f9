"""`MLXOps`: llama_models.Ops on MLX arrays (Metal or the CPU, the same code), for the decoder
and the BERT encoder alike. Weights are arrays of the compute dtype or `QuantWeight`s, which
`mx.quantized_matmul` multiplies without a float copy."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from llama_models.ops import RopeSpec
from llama_runtime.mlx_backend.weights import QuantWeight
from llama_runtime.step import HeadRotary

__all__ = ["MLXOps"]


class MLXOps:
    """Arrays are [N, features] for the decoder (positions come as a numpy array: the rotary
    tables are computed by step.rope_tables, the same bits as the native step's), padded
    [B, T, ...] with a [B, T] bool mask for the encoder."""

    def __init__(self, dtype: mx.Dtype) -> None:
        self.dtype = dtype
        self._rotary = HeadRotary()

    def embedding(self, table: Any, ids: mx.array) -> mx.array:
        if isinstance(table, QuantWeight):
            return table.rows(ids).astype(self.dtype)
        return table[ids]

    def linear(self, x: mx.array, weight: Any) -> mx.array:
        if isinstance(weight, QuantWeight):
            return weight.matmul(x)
        return x @ weight.T

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    def rotary(self, positions: np.ndarray, spec: RopeSpec) -> tuple[mx.array, mx.array]:
        cos, sin = self._rotary(positions, spec)
        return mx.array(cos).astype(self.dtype), mx.array(sin).astype(self.dtype)

    def rope(self, x: mx.array, rot: tuple[mx.array, mx.array]) -> mx.array:
        cos, sin = rot
        half = x.shape[-1] // 2
        rotated = mx.concatenate((-x[..., half:], x[..., :half]), axis=-1)
        return x * cos + rotated * sin

    def attention(self, q: mx.array, k: mx.array, v: mx.array, batch: Any, layer: int,
                  scale: float, *, window: int = 0) -> mx.array:
        return batch.attend(q, k, v, layer, scale, window=window)

    def silu(self, x: mx.array) -> mx.array:
        return x * mx.sigmoid(x)

    def take_rows(self, x: mx.array, batch: Any) -> mx.array:
        return x[batch.logits_rows]

    # -- encoders (BERT family) -----------------------------------------------------------------
    def linear_bias(self, x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        return mx.addmm(bias, x, weight.T)

    def layer_norm(self, x: mx.array, weight: mx.array, bias: mx.array,
                   eps: float) -> mx.array:
        return mx.fast.layer_norm(x, weight, bias, eps)

    def gelu(self, x: mx.array, approximate: bool = False) -> mx.array:
        if approximate:
            c = math.sqrt(2.0 / math.pi)
            return 0.5 * x * (1.0 + mx.tanh(c * (x + 0.044715 * x * x * x)))
        return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))

    def key_mask(self, mask: mx.array) -> mx.array | None:
        # [B, 1, 1, T]: every query row of a sequence sees the same keys; None = no padding
        return None if bool(mask.all()) else mask[:, None, None, :]

    def encoder_attention(self, q: mx.array, k: mx.array, v: mx.array,
                          key_mask: mx.array | None, scale: float) -> mx.array:
        b, t, h, d = q.shape
        out = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            scale=scale, mask=key_mask)
        return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)

    def pool(self, x: mx.array, mask: mx.array, modes: tuple[str, ...]) -> mx.array:
        """Pooled in float32 (as sentence-transformers accumulates half-precision inputs)."""
        x = x.astype(mx.float32)
        keep = mask[..., None].astype(mx.float32)  # [B, T, 1]
        lengths = mx.maximum(keep.sum(1), 1.0)  # [B, 1]
        out: list[mx.array] = []
        for mode in modes:
            if mode == "cls":
                out.append(x[:, 0])
            elif mode == "max":
                out.append(mx.where(mask[..., None], x, -mx.inf).max(1))
            elif mode == "mean":
                out.append((x * keep).sum(1) / lengths)
            elif mode == "mean_sqrt_len_tokens":
                out.append((x * keep).sum(1) / mx.sqrt(lengths))
            elif mode == "weightedmean":
                w = keep * mx.arange(1, x.shape[1] + 1, dtype=mx.float32)[None, :, None]
                out.append((x * w).sum(1) / mx.maximum(w.sum(1), 1e-9))
            elif mode == "lasttoken":
                last = mx.maximum(mask.astype(mx.int32).sum(1), 1) - 1
                out.append(x[mx.arange(x.shape[0]), last])
            else:
                raise ValueError(f"unknown pooling mode {mode!r}")
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=-1)

    def l2_normalize(self, x: mx.array) -> mx.array:
        norm = mx.sqrt((x * x).sum(-1, keepdims=True))
        return x / mx.maximum(norm, 1e-12)
