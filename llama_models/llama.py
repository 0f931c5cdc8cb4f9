"""The Llama family: Llama 2/3, SmolLM2, Mistral (its sliding window included).

References: Touvron et al. 2023 (Llama 2), the Llama 3 herd paper (RoPE scaling), Jiang et al.
2023 (Mistral 7B: sliding-window attention). The layer is DecoderConfig's default one.
llama.cpp's converter interleaves the rows of Q and K of this family for its RoPE layout (the
other families keep HF's order); we undo that at load so one rotate-half RoPE serves both
formats.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from llama_models.checkpoint import RawTensor
from llama_models.config_reader import ConfigReader
from llama_models.decoder import (
    MAX_WINDOW,
    DecoderConfig,
    base_config,
    check_activation,
    hf_windows,
    refuse_options,
)

NAME = "Llama-family"
GGUF_ARCHITECTURES = ("llama",)
HF_ARCHITECTURES = ("llama", "mistral")


def config(r: ConfigReader) -> DecoderConfig:
    check_activation(r, NAME, ("silu",))
    refuse_options(r, NAME, attention_bias="biases on the attention products",
                   mlp_bias="biases on the MLP products")
    cfg = DecoderConfig(family="llama", **base_config(r))
    if r.is_gguf:
        window = r.int("attention.sliding_window", MAX_WINDOW, 0, lo=0)
        windows = (window,) * cfg.n_layers if window else ()
    else:
        windows = hf_windows(r, cfg.n_layers, default_all=True)
    if windows and min(windows) >= cfg.context_length:
        windows = ()  # a window as long as the context is global attention
    return replace(cfg, windows=windows)


def adapt_weights(named: dict[str, RawTensor], cfg: DecoderConfig,
                  fmt: str) -> dict[str, RawTensor]:
    if fmt == "gguf":
        for i in range(cfg.n_layers):
            for key, heads in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)):
                name = f"blk.{i}.{key}.weight"
                if name in named:  # a missing one is reported by the shape check
                    named[name] = _unpermute_rows(named[name], heads)
    return named


def _unpermute_rows(t: RawTensor, n_heads: int) -> RawTensor:
    """Undo llama.cpp's row interleaving of Q/K: within each head, GGUF row 2i + h holds HF row
    h * (head_dim / 2) + i. Rows are whole quant blocks, so this works on quantized bytes."""
    rows = t.shape[0]
    half = rows // n_heads // 2
    order = np.arange(rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)
    data = np.asarray(t.data)
    return RawTensor(t.name, t.qtype, t.shape, np.ascontiguousarray(data[order]))
