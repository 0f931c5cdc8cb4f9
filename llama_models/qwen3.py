"""Qwen3 (dense): the Llama layer with RMSNorm over each head of Q and K before RoPE, and an
explicit head width (`head_dim`, not always dim / heads).

Reference: Qwen3 Technical Report (Yang et al. 2025). Qwen3's MoE models (qwen3_moe) are a
different architecture and are refused by name.
"""

from __future__ import annotations

from dataclasses import replace

from llama_models.config_reader import ConfigReader
from llama_models.decoder import DecoderConfig, base_config, check_activation, refuse_options
from llama_models.qwen2 import qwen_windows

NAME = "Qwen3"
GGUF_ARCHITECTURES = ("qwen3",)
HF_ARCHITECTURES = ("qwen3",)


def config(r: ConfigReader) -> DecoderConfig:
    check_activation(r, NAME, ("silu",))
    refuse_options(r, NAME, attention_bias="biases on the attention products")
    cfg = DecoderConfig(family="qwen3", qk_norm=True, **base_config(r))
    return replace(cfg, windows=qwen_windows(r, cfg))
