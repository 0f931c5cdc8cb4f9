"""Qwen2 and Qwen2.5: the Llama layer with a bias on the Q, K and V products.

Reference: Qwen2 Technical Report (Yang et al. 2024). HF configs may turn on sliding windows
(`use_sliding_window`, for the layers from `max_window_layers` on; transformers >= 4.53 writes
them as `layer_types`); the released models keep them off.
"""

from __future__ import annotations

from dataclasses import replace

from llama_models.checkpoint import MAX_LAYERS
from llama_models.config_reader import ConfigReader
from llama_models.decoder import (
    MAX_WINDOW,
    DecoderConfig,
    base_config,
    check_activation,
    hf_windows,
)

NAME = "Qwen2"
GGUF_ARCHITECTURES = ("qwen2",)
HF_ARCHITECTURES = ("qwen2",)


def config(r: ConfigReader) -> DecoderConfig:
    check_activation(r, NAME, ("silu",))
    cfg = DecoderConfig(family="qwen2", qkv_bias=True, **base_config(r))
    return replace(cfg, windows=qwen_windows(r, cfg))


def qwen_windows(r: ConfigReader, cfg: DecoderConfig) -> tuple[int, ...]:
    """Qwen's optional sliding windows (Qwen2 and Qwen3 configs share the keys)."""
    if r.is_gguf:
        return ()  # llama.cpp's converter writes none for Qwen
    if r.has("layer_types"):
        return hf_windows(r, cfg.n_layers, default_all=False)
    if not r.bool("use_sliding_window", False):
        return ()
    window = r.int("sliding_window", MAX_WINDOW)
    first = r.int("max_window_layers", MAX_LAYERS, cfg.n_layers, lo=0)
    return tuple(window if i >= first else 0 for i in range(cfg.n_layers))
