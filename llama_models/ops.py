"""The layer-level operations an architecture is written against, and that a backend provides.

An architecture file never imports torch or mlx: it receives an `Ops` object and calls it. Array
arguments are the backend's own arrays; weights are whatever the backend prepared at load time
(plain or quantized), which only `linear` and `embedding` need to understand.

Shapes: the tokens of every sequence in a step are flattened into one dimension N, so one call
serves a whole batch; `batch` is the backend's description of which tokens belong to which
sequence and where their keys and values live in the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from llama_engine.errors import UnsupportedArchitectureError

__all__ = ["POOLING_MODES", "Ops", "RopeSpec"]

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
"""What `Ops.pool` understands (the names sentence-transformers uses)."""


def rope_kind(rope: Mapping[str, Any]) -> Any:
    """A RoPE parameters object's type (HF writes "rope_type", older files "type")."""
    return rope.get("rope_type", rope.get("type"))


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """Rotary embedding of one model: rotate-half ("NeoX") layout over the first `rotary_dim`
    features of each head. `scaling` follows HF's rope_scaling dict (type linear or llama3)."""

    head_dim: int
    rotary_dim: int
    theta: float
    scaling: dict[str, Any] | None = None
    freq_factors: tuple[float, ...] | None = field(default=None, repr=False)
    """Per-frequency divisors stored in some GGUFs (rope_freqs.weight, Llama 3.1 style), or
    LongRoPE's short factors."""
    long_factors: tuple[float, ...] | None = field(default=None, repr=False)
    """LongRoPE (Phi-3): the divisors for a context longer than `original_context`."""
    original_context: int = 0
    attention_factor: float = 1.0
    """cos and sin are multiplied by it (LongRoPE's sqrt(1 + ln(s) / ln(original)))."""

    def for_context(self, context: int) -> RopeSpec:
        """The table an engine of `context` positions uses: LongRoPE's long factors when the
        context exceeds the original one, else its short ones (llama.cpp's rule: pass a
        context_length at most the original to keep the short factors)."""
        if self.long_factors is None or context <= self.original_context:
            return self
        return replace(self, freq_factors=self.long_factors)

    def inv_freq(self) -> np.ndarray:
        """float64 [rotary_dim // 2]: the angle per position of each rotated pair."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.rotary_dim, 2, dtype=np.float64)
                                    / self.rotary_dim))
        if self.freq_factors is not None:
            inv = inv / np.asarray(self.freq_factors, dtype=np.float64)
        s = self.scaling or {}
        kind = rope_kind(s)
        if kind == "linear":
            inv = inv / float(s["factor"])
        elif kind == "llama3" and self.freq_factors is None:
            inv = _llama3_scale(inv, s)
        elif kind not in (None, "default", "llama3"):
            raise UnsupportedArchitectureError(
                f"RoPE scaling {kind!r} is not supported (linear and llama3 are); use a model "
                "without it or another build of the model")
        return inv


def _llama3_scale(inv: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    return np.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)


class Ops(Protocol):
    """What a backend implements. `x` arrays are [N, features] unless said otherwise."""

    def embedding(self, table: Any, ids: Any) -> Any:
        """Rows of `table` for token ids [N] -> [N, D]."""

    def linear(self, x: Any, weight: Any) -> Any:
        """x @ weight.T; weight [out, in], possibly quantized."""

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...

    def rotary(self, positions: Any, spec: RopeSpec) -> Any:
        """Precompute what `rope` needs for these positions (once per forward)."""

    def rope(self, x: Any, rot: Any) -> Any:
        """Rotate x [N, H, head_dim] by the angles in `rot`."""

    def attention(self, q: Any, k: Any, v: Any, batch: Any, layer: int, scale: float, *,
                  window: int = 0) -> Any:
        """Write k, v [N, Hkv, D] to the cache for `layer`, attend q [N, Hq, D] over each
        sequence's cached keys with the causal mask (and, when `window` > 0, over the last
        `window` positions only, the query's own included); returns [N, Hq * D]."""

    def silu(self, x: Any) -> Any: ...

    def take_rows(self, x: Any, batch: Any) -> Any:
        """The rows of x whose logits are wanted (the last token of each sequence)."""

    # -- encoders (BERT family): arrays are padded [B, T, ...] with a [B, T] bool mask ----------
    def linear_bias(self, x: Any, weight: Any, bias: Any) -> Any:
        """x @ weight.T + bias; weight [out, in] (dense), bias [out]."""

    def layer_norm(self, x: Any, weight: Any, bias: Any, eps: float) -> Any: ...

    def gelu(self, x: Any, approximate: bool = False) -> Any:
        """GELU with erf, or its tanh approximation when `approximate`."""

    def key_mask(self, mask: Any) -> Any:
        """Prepare `encoder_attention`'s mask from mask [B, T] (True = a real token), once per
        forward; the backend may return None when nothing is padded."""

    def encoder_attention(self, q: Any, k: Any, v: Any, key_mask: Any, scale: float) -> Any:
        """Bidirectional attention of q, k, v [B, T, H, D] where every query sees every real
        key of its own row; returns [B, T, H * D]."""

    def pool(self, x: Any, mask: Any, modes: tuple[str, ...]) -> Any:
        """x [B, T, D] over the real tokens of each row -> [B, D * len(modes)], one pooled
        vector per mode, concatenated in order: "cls" (first token), "max", "mean",
        "mean_sqrt_len_tokens" (sum / sqrt(length)), "weightedmean" (position-weighted mean),
        "lasttoken". Padding is on the right."""

    def l2_normalize(self, x: Any) -> Any:
        """Each row of x [B, D] divided by its Euclidean norm (rows of zeros stay zero)."""
