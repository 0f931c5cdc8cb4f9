"""Gemma 3 text models: interleaved sliding-window and global attention layers with their own
RoPE bases, GELU-tanh gated MLP, `(1 + w)` RMSNorm before and after attention and the MLP, Q/K
norms, embeddings scaled by sqrt(dim), queries scaled by `query_pre_attn_scalar`.

Reference: Gemma 3 Technical Report (Gemma Team 2025) and transformers' Gemma3 modeling.
llama.cpp's converter adds the 1 of `(1 + w)` to every norm weight when it writes a GGUF; an HF
checkpoint's norms get it at load, so one plain RMSNorm serves both formats. GGUF files store
neither the layer pattern nor the local RoPE base unless they differ from llama.cpp's defaults
(every sixth layer global; base 10,000), nor query_pre_attn_scalar (llama.cpp scales queries by
head_dim ** -0.5, and by (dim / heads) ** -0.5 for the 62-layer 27B, as Gemma's own code does).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from llama_engine.errors import ConfigError
from llama_models.checkpoint import F32, MAX_DIM, RawTensor, float32
from llama_models.config_reader import ConfigReader
from llama_models.decoder import (
    MAX_WINDOW,
    DecoderConfig,
    base_config,
    check_activation,
    hf_windows,
    refuse_options,
)

NAME = "Gemma 3"
GGUF_ARCHITECTURES = ("gemma3",)
HF_ARCHITECTURES = ("gemma3_text", "gemma3")
"""gemma3: the multimodal checkpoints (Gemma3ForConditionalGeneration), whose language model is
read (the checkpoint reader leaves the vision tower and projector out: text in, text out)."""

HF_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
               "language_model.lm_head.": "lm_head."}
"""A multimodal checkpoint's language-model names (the released files' and transformers 5's)
-> the text model's."""

HF_WEIGHTS = {
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"blk.\1.post_attention_norm.weight",
    r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight": r"blk.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight": r"blk.\1.post_ffw_norm.weight",
}
_PATTERN = 6  # llama.cpp's default: layers 5, 11, 17, ... attend globally
_LOCAL_THETA = 10_000.0


def config(r: ConfigReader) -> DecoderConfig:
    if not r.is_gguf and r.has("text_config"):  # a multimodal checkpoint: its language model
        r = ConfigReader(r.mapping("text_config"), f"{r.source} (text_config)")
    check_activation(r, NAME, ("gelu_pytorch_tanh", "gelu_tanh"))
    refuse_options(r, NAME, attn_logit_softcapping="soft-capped attention scores",
                   final_logit_softcapping="soft-capped logits")
    base = base_config(r)
    cfg = DecoderConfig(family="gemma3", qk_norm=True, sandwich_norms=True,
                        activation="gelu_tanh", embed_scale=float(np.sqrt(base["dim"])), **base)
    n = cfg.n_layers
    if r.is_gguf:
        window = r.int("attention.sliding_window", MAX_WINDOW, 0, lo=0)
        pattern = r.get("attention.sliding_window_pattern", _PATTERN)
        if isinstance(pattern, list):  # one flag per layer
            if len(pattern) != n or not all(isinstance(p, bool) for p in pattern):
                raise ConfigError(f"{r.source}: {r.key('attention.sliding_window_pattern')} "
                                  f"should hold one true/false per layer ({n})")
            windowed = pattern
        else:
            every = r.int("attention.sliding_window_pattern", 1 << 16, _PATTERN, lo=0)
            windowed = [every == 0 or i % every < every - 1 for i in range(n)]
        windows = tuple(window if w else 0 for w in windowed) if window else ()
        local_theta = r.float("rope.freq_base_swa", _LOCAL_THETA)
        query = (cfg.dim // cfg.n_heads) if n == 62 else cfg.head_dim
    else:
        if r.has("layer_types"):
            windows = hf_windows(r, n, default_all=False)
        else:  # transformers < 4.53: sliding_window_pattern
            every = r.int("sliding_window_pattern", 1 << 16, _PATTERN)
            window = r.int("sliding_window", MAX_WINDOW)
            windows = tuple(0 if (i + 1) % every == 0 else window for i in range(n))
        local = r.mapping("rope_parameters").get("sliding_attention", {})
        local_theta = float(local.get("rope_theta", r.float("rope_local_base_freq",
                                                               _LOCAL_THETA)))
        query = r.int("query_pre_attn_scalar", MAX_DIM, cfg.head_dim)
    return replace(cfg, windows=windows if any(windows) else (), query_scale=query ** -0.5,
                   local_rope_theta=local_theta if any(windows) else None)


def adapt_weights(named: dict[str, RawTensor], cfg: DecoderConfig,
                  fmt: str) -> dict[str, RawTensor]:
    """HF norm weights w become 1 + w, in float32 (the GGUF converter's own shift)."""
    if fmt == "hf":
        for name, t in named.items():
            if name.endswith("norm.weight"):
                named[name] = RawTensor(t.name, F32, t.shape, float32(t) + np.float32(1.0))
    return named
