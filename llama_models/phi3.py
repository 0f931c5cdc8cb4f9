"""Phi-3 and Phi-3.5 (mini, medium): the Llama layer with Q, K, V in one product (`qkv_proj`,
GGUF `attn_qkv`) and gate and up in one (`gate_up_proj`, GGUF `ffn_up` of twice the rows),
split at load into the shared layer's weights; LongRoPE ("longrope", formerly "su") scaling
with its short and long factors; a sliding window on every layer when the config gives one.

Reference: Phi-3 Technical Report (Abdin et al. 2024) and transformers' Phi3 modeling. The
long factors are used when the engine's context exceeds `original_max_position_embeddings`
(llama.cpp's rule; transformers switches by the length of each forward instead), see
RopeSpec.for_context. llama.cpp ignores Phi-3's sliding window; we keep it, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from llama_engine.errors import ConfigError, UnsupportedArchitectureError, WeightLoadError
from llama_models.checkpoint import MAX_CONTEXT, Checkpoint, RawTensor
from llama_models.config_reader import MISSING, ConfigReader
from llama_models.decoder import (
    MAX_WINDOW,
    DecoderConfig,
    base_config,
    check_activation,
    hf_rope_parameters,
    refuse_options,
)
from llama_models.ops import RopeSpec, rope_kind

NAME = "Phi-3"
GGUF_ARCHITECTURES = ("phi3",)
HF_ARCHITECTURES = ("phi3",)

HF_WEIGHTS = {
    r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight": r"blk.\1.attn_qkv.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight": r"blk.\1.ffn_up.weight",
}


def config(r: ConfigReader) -> DecoderConfig:
    check_activation(r, NAME, ("silu",))
    refuse_options(r, NAME, attention_bias="biases on the attention products")
    base = base_config(r)
    if not r.is_gguf and r.float("partial_rotary_factor", 1.0, hi=1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"{r.source}: partial_rotary_factor={r.get('partial_rotary_factor')} (rotary "
            f"embeddings on part of each head) is not supported for {NAME} models yet")
    rope = base.pop("rope_scaling") or {}
    if rope_kind(rope) in ("longrope", "su"):
        rope = {}  # read by rope_spec below, with its factors
    cfg = DecoderConfig(family="phi3", rope_scaling=rope or None, **base)
    window = r.int("attention.sliding_window" if r.is_gguf else "sliding_window", MAX_WINDOW,
                   0, lo=0)
    if window and window < cfg.context_length:
        cfg = replace(cfg, windows=(window,) * cfg.n_layers)
    return cfg


def rope_spec(cfg: DecoderConfig, ckpt: Checkpoint, r: ConfigReader) -> RopeSpec | None:
    """LongRoPE's table (short and long factors, original context, attention factor), or None
    for a model without it (the shared reading then applies)."""
    half = cfg.head_dim // 2
    if r.is_gguf:
        if "rope_factors_long.weight" not in ckpt.tensors:
            return None
        factors = []
        for name in ("rope_factors_short.weight", "rope_factors_long.weight"):
            t = ckpt.tensors.get(name)
            if t is None or t.qtype != 0 or t.shape != (half,):
                raise WeightLoadError(f"{ckpt.path}: {name} should be F32 of shape ({half},)")
            factors.append(tuple(float(x) for x in np.asarray(t.data).view(np.float32)))
        original = r.int("rope.scaling.original_context_length", MAX_CONTEXT)
        attention = r.float("rope.scaling.attn_factor", 1.0)
    else:
        key, rope = hf_rope_parameters(r)
        if rope_kind(rope) not in ("longrope", "su"):
            return None
        factors = []
        for k in ("short_factor", "long_factor"):
            f = rope.get(k)
            if not isinstance(f, list) or len(f) != half or not all(
                    isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in f):
                raise ConfigError(f"{r.source}: {key}.{k} should list {half} positive numbers")
            factors.append(tuple(float(x) for x in f))
        original = r.int("original_max_position_embeddings", MAX_CONTEXT,
                         rope.get("original_max_position_embeddings", MISSING))
        scale = cfg.context_length / original
        attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        if rope.get("attention_factor") is not None:
            attention = float(rope["attention_factor"])
    return RopeSpec(head_dim=cfg.head_dim, rotary_dim=cfg.head_dim, theta=cfg.rope_theta,
                    freq_factors=factors[0], long_factors=factors[1], original_context=original,
                    attention_factor=attention)


def adapt_weights(named: dict[str, RawTensor], cfg: DecoderConfig,
                  fmt: str) -> dict[str, RawTensor]:
    """Split the fused products along their rows (whole quant blocks: works on quantized
    bytes): attn_qkv -> attn_q, attn_k, attn_v; ffn_up (gate then up) -> ffn_gate, ffn_up."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        qkv = named.pop(f"blk.{i}.attn_qkv.weight", None)
        if qkv is not None:
            for name, (r0, r1) in (("attn_q", (0, q)), ("attn_k", (q, q + kv)),
                                   ("attn_v", (q + kv, q + 2 * kv))):
                named[f"blk.{i}.{name}.weight"] = _rows(qkv, r0, r1, f"blk.{i}.{name}.weight")
        up = named.get(f"blk.{i}.ffn_up.weight")
        if up is not None and up.shape[0] == 2 * cfg.ffn_dim:
            f = cfg.ffn_dim
            named[f"blk.{i}.ffn_gate.weight"] = _rows(up, 0, f, f"blk.{i}.ffn_gate.weight")
            named[f"blk.{i}.ffn_up.weight"] = _rows(up, f, 2 * f, f"blk.{i}.ffn_up.weight")
    return named


def _rows(t: RawTensor, r0: int, r1: int, name: str) -> RawTensor:
    if t.shape[0] < r1:
        raise WeightLoadError(f"{t.name} has {t.shape[0]} rows, fewer than the {r1} its parts "
                              "need; the file is inconsistent")
    return RawTensor(name, t.qtype, (r1 - r0, *t.shape[1:]), t.data[r0:r1])
