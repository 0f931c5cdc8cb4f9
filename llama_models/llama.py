"""The Llama family: Llama 2/3, SmolLM2, Mistral (full attention), written once against `Ops`.

References: Touvron et al. 2023 (Llama 2), the Llama 3 herd paper (RoPE scaling), and the GGUF
tensor naming of llama.cpp. Weights use GGUF's names; HF checkpoints are renamed by WEIGHT_MAP.
llama.cpp's converter interleaves the rows of Q and K for its RoPE layout; we undo that at load
so one rotate-half RoPE serves both formats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_engine.errors import ConfigError, WeightLoadError
from llama_models.checkpoint import (
    MAX_CONTEXT,
    MAX_DIM,
    MAX_FFN_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    Checkpoint,
    RawTensor,
    check_float,
    check_int,
    check_tensors,
    rename_hf_tensors,
    typed_errors,
)
from llama_models.ops import Ops, RopeSpec

__all__ = ["WEIGHT_MAP", "LlamaConfig", "LlamaModel", "load_weights"]

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = ("llama",)
HF_ARCHITECTURES = ("llama", "mistral")

WEIGHT_MAP: dict[str, str] = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"blk.\1.attn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight": r"blk.\1.attn_q.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight": r"blk.\1.attn_k.weight",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight": r"blk.\1.attn_v.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"blk.\1.attn_output.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"blk.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": r"blk.\1.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": r"blk.\1.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": r"blk.\1.ffn_down.weight",
}
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_MAX_WINDOW = 1 << 32  # only ever caps the context, so any size of window is harmless


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    context_length: int
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], source: str = "GGUF") -> LlamaConfig:
        arch = meta["general.architecture"]
        missing = object()

        def get(key: str, default: Any = missing) -> Any:
            full = f"{arch}.{key}"
            if full in meta and meta[full] is not None:
                return meta[full]
            if default is missing:
                raise ConfigError(f"{source} lacks the key {full!r}; the file is incomplete")
            return default

        def num(key: str, hi: int, default: Any = missing) -> int:
            return check_int(get(key, default), f"{arch}.{key}", source, hi=hi)

        n_heads = num("attention.head_count", MAX_HEADS)
        dim = num("embedding_length", MAX_DIM)
        vocab = meta.get(f"{arch}.vocab_size")
        vocab_key = f"{arch}.vocab_size"
        if vocab is None or vocab == 0:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) else 0
            vocab_key = "the length of tokenizer.ggml.tokens"
        if not vocab:
            raise ConfigError(f"{source} gives no vocabulary size ({arch}.vocab_size)")
        scaling = None
        kind = meta.get(f"{arch}.rope.scaling.type")
        if kind in ("linear", "llama3"):
            factor = check_float(get("rope.scaling.factor"), f"{arch}.rope.scaling.factor", source)
            scaling = {"rope_type": kind, "factor": factor}
        ctx = num("context_length", MAX_CONTEXT)
        window = get("attention.sliding_window", 0)
        window = check_int(window, f"{arch}.attention.sliding_window", source, lo=0,
                           hi=_MAX_WINDOW)
        if window and window < ctx:
            log.warning("%s uses a %d-token sliding window; capping the context to it",
                        source, window)
            ctx = window
        kv_heads = num("attention.head_count_kv", MAX_HEADS, n_heads)
        if meta.get(f"{arch}.attention.key_length") is not None:
            head_dim = num("attention.key_length", MAX_DIM)
        elif meta.get(f"{arch}.rope.dimension_count") is not None:
            head_dim = num("rope.dimension_count", MAX_DIM)
        else:
            head_dim = _derived_head_dim(dim, n_heads, f"{arch}.embedding_length",
                                         f"{arch}.attention.head_count", source)
        return cls(
            vocab_size=check_int(vocab, vocab_key, source, hi=MAX_VOCAB),
            dim=dim,
            n_layers=num("block_count", MAX_LAYERS),
            n_heads=n_heads,
            n_kv_heads=_kv_heads(kv_heads, n_heads, f"{arch}.attention.head_count_kv", source),
            ffn_dim=num("feed_forward_length", MAX_FFN_DIM),
            head_dim=_even_head_dim(head_dim, source),
            context_length=ctx,
            norm_eps=check_float(get("attention.layer_norm_rms_epsilon", 1e-5),
                                 f"{arch}.attention.layer_norm_rms_epsilon", source, hi=1.0),
            rope_theta=check_float(get("rope.freq_base", 10_000.0), f"{arch}.rope.freq_base",
                                   source),
            rope_scaling=scaling,
        )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        def get(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"{source} lacks the key {key!r}")
            return cfg[key]

        def num(key: str, hi: int) -> int:
            return check_int(get(key), key, source, hi=hi)

        n_heads = num("num_attention_heads", MAX_HEADS)
        dim = num("hidden_size", MAX_DIM)
        ctx = num("max_position_embeddings", MAX_CONTEXT)
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, factor, ...}; older
        # files have rope_theta and rope_scaling side by side.
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        raw_rope = cfg.get(rope_key) or {}
        if not isinstance(raw_rope, Mapping):
            raise ConfigError(f"{source}: {rope_key} should be an object, got {raw_rope!r}; "
                              "restore the file")
        rope = dict(raw_rope)
        theta = check_float(rope.pop("rope_theta", cfg.get("rope_theta", 10_000.0)),
                            "rope_theta", source)
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = {}
        _check_rope_scaling(rope, f"{source}: {rope_key}")
        window = cfg.get("sliding_window")
        if window is not None:
            window = check_int(window, "sliding_window", source, lo=0, hi=_MAX_WINDOW)
        if window and window < ctx:
            log.warning("%s uses a %d-token sliding window; capping the context to it",
                        source, window)
            ctx = window
        kv_heads = cfg.get("num_key_value_heads")
        if kv_heads is None:
            kv_heads = n_heads
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            head_dim = _derived_head_dim(dim, n_heads, "hidden_size", "num_attention_heads",
                                         source)
        tie = cfg.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"{source}: tie_word_embeddings should be true or false, got "
                              f"{tie!r}; restore the file")
        return cls(
            vocab_size=num("vocab_size", MAX_VOCAB),
            dim=dim,
            n_layers=num("num_hidden_layers", MAX_LAYERS),
            n_heads=n_heads,
            n_kv_heads=_kv_heads(check_int(kv_heads, "num_key_value_heads", source,
                                           hi=MAX_HEADS), n_heads, "num_key_value_heads", source),
            ffn_dim=num("intermediate_size", MAX_FFN_DIM),
            head_dim=_even_head_dim(check_int(head_dim, "head_dim", source, hi=MAX_DIM), source),
            context_length=ctx,
            norm_eps=check_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", source, hi=1.0),
            rope_theta=theta,
            rope_scaling=rope or None,
            tie_embeddings=tie,
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, hd = self.dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d),
            "output_norm.weight": (d,),
        }
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.attn_q.weight": (self.n_heads * hd, d),
                f"blk.{i}.attn_k.weight": (self.n_kv_heads * hd, d),
                f"blk.{i}.attn_v.weight": (self.n_kv_heads * hd, d),
                f"blk.{i}.attn_output.weight": (d, self.n_heads * hd),
                f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.ffn_gate.weight": (self.ffn_dim, d),
                f"blk.{i}.ffn_up.weight": (self.ffn_dim, d),
                f"blk.{i}.ffn_down.weight": (d, self.ffn_dim),
            }
        return shapes


def _derived_head_dim(dim: int, n_heads: int, dim_key: str, heads_key: str,
                      source: str) -> int:
    if dim % n_heads:
        raise ConfigError(f"{source}: {dim_key} {dim} is not a multiple of {heads_key} "
                          f"{n_heads}, and no head width is given; the file is inconsistent")
    return dim // n_heads


def _kv_heads(kv_heads: int, n_heads: int, key: str, source: str) -> int:
    if n_heads % kv_heads:
        raise ConfigError(f"{source}: {key} {kv_heads} does not divide the {n_heads} attention "
                          "heads; the file is inconsistent")
    return kv_heads


def _even_head_dim(head_dim: int, source: str) -> int:
    if head_dim % 2:
        raise ConfigError(f"{source}: the head width {head_dim} is odd; rotary embeddings need "
                          "an even one, the file is inconsistent")
    return head_dim


def _check_rope_scaling(rope: Mapping[str, Any], source: str) -> None:
    """The numbers RopeSpec reads from a linear or llama3 scaling are numbers."""
    if rope.get("rope_type", rope.get("type")) not in ("linear", "llama3"):
        return  # anything else is refused by RopeSpec.inv_freq, with its own message
    check_float(rope.get("factor"), "factor", source)
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key in rope:
            check_float(rope[key], key, source)


def config_from_checkpoint(ckpt: Checkpoint) -> LlamaConfig:
    """The checked configuration; every failure is a `LlamaError` (ConfigError for a bad
    value)."""
    with typed_errors(f"the configuration of {ckpt.path}"):
        return _config_from_checkpoint(ckpt)


def _config_from_checkpoint(ckpt: Checkpoint) -> LlamaConfig:
    if ckpt.format == "gguf":
        cfg = LlamaConfig.from_gguf(ckpt.metadata, str(ckpt.path))
        tied = "output.weight" not in ckpt.tensors
    else:
        cfg = LlamaConfig.from_hf(ckpt.metadata, str(ckpt.path / "config.json"))
        tied = cfg.tie_embeddings or "lm_head.weight" not in ckpt.tensors
    return LlamaConfig(**{**cfg.__dict__, "tie_embeddings": tied})


def rope_spec(cfg: LlamaConfig, ckpt: Checkpoint) -> RopeSpec:
    with typed_errors(f"the rotary embedding of {ckpt.path}"):
        return _rope_spec(cfg, ckpt)


def _rope_spec(cfg: LlamaConfig, ckpt: Checkpoint) -> RopeSpec:
    factors = None
    if "rope_freqs.weight" in ckpt.tensors:
        t = ckpt.tensors["rope_freqs.weight"]
        if t.qtype not in (0, 1) or t.shape != (cfg.head_dim // 2,):  # F32 or F16
            raise WeightLoadError(
                f"{ckpt.path}: rope_freqs.weight is type {t.qtype} of shape {t.shape}, not F32 "
                f"of shape ({cfg.head_dim // 2},); the file is inconsistent")
        factors = tuple(float(x) for x in np.asarray(t.data))
    spec = RopeSpec(head_dim=cfg.head_dim, rotary_dim=cfg.head_dim, theta=cfg.rope_theta,
                    scaling=cfg.rope_scaling, freq_factors=factors)
    spec.inv_freq()  # refuses an unsupported scaling now, at load, not at the first forward
    return spec


def load_weights(ckpt: Checkpoint, cfg: LlamaConfig) -> dict[str, RawTensor]:
    """The checkpoint's tensors under GGUF names, shape-checked, Q/K rows in HF order."""
    with typed_errors(f"the weights of {ckpt.path}"):
        return _load_weights(ckpt, cfg)


def _load_weights(ckpt: Checkpoint, cfg: LlamaConfig) -> dict[str, RawTensor]:
    if ckpt.format == "hf":
        named = rename_hf_tensors(ckpt, WEIGHT_MAP, _HF_IGNORED, "a Llama-family model")
    else:
        named = {n: t for n, t in ckpt.tensors.items() if n != "rope_freqs.weight"}
    check_tensors(ckpt.path, named, cfg.expected_shapes(), "a Llama-family model",
                  optional=frozenset({"output.weight"}), shapes_from="the model's configuration",
                  order=_natural)
    if ckpt.format == "gguf":
        for i in range(cfg.n_layers):
            for key, heads in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)):
                name = f"blk.{i}.{key}.weight"
                named[name] = _unpermute_rows(named[name], heads)
    return named


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _unpermute_rows(t: RawTensor, n_heads: int) -> RawTensor:
    """Undo llama.cpp's row interleaving of Q/K: within each head, GGUF row 2i + h holds HF row
    h * (head_dim / 2) + i. Rows are whole quant blocks, so this works on quantized bytes."""
    rows = t.shape[0]
    half = rows // n_heads // 2
    order = np.arange(rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)
    data = np.asarray(t.data)
    return RawTensor(t.name, t.qtype, t.shape, np.ascontiguousarray(data[order]))


class LlamaModel:
    """The forward pass. `weights` are backend-prepared arrays under GGUF names."""

    def __init__(self, cfg: LlamaConfig, rope: RopeSpec, weights: Mapping[str, Any],
                 ops: Ops) -> None:
        self.cfg, self.rope, self.ops = cfg, rope, ops
        self.embed = weights["token_embd.weight"]
        self.out_norm = weights["output_norm.weight"]
        self.output = weights.get("output.weight", self.embed)
        self.layers = [
            {k: weights[f"blk.{i}.{k}.weight"] for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            for i in range(cfg.n_layers)
        ]
        self.scale = cfg.head_dim ** -0.5

    def forward(self, tokens: Any, positions: Any, batch: Any, *, hidden: bool = False) -> Any:
        """tokens, positions: [N]; returns logits [M, vocab] for the rows batch asks for, or
        with `hidden` their final-normed hidden states [M, dim] (for embeddings)."""
        ops, cfg = self.ops, self.cfg
        n = tokens.shape[0]
        rot = ops.rotary(positions, self.rope)
        x = ops.embedding(self.embed, tokens)
        for i, w in enumerate(self.layers):
            h = ops.rms_norm(x, w["attn_norm"], cfg.norm_eps)
            q = ops.linear(h, w["attn_q"]).reshape(n, cfg.n_heads, cfg.head_dim)
            k = ops.linear(h, w["attn_k"]).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = ops.linear(h, w["attn_v"]).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            a = ops.attention(ops.rope(q, rot), ops.rope(k, rot), v, batch, i, self.scale)
            x = x + ops.linear(a, w["attn_output"])
            h = ops.rms_norm(x, w["ffn_norm"], cfg.norm_eps)
            x = x + ops.linear(ops.silu(ops.linear(h, w["ffn_gate"])) * ops.linear(h, w["ffn_up"]),
                               w["ffn_down"])
        x = ops.rms_norm(ops.take_rows(x, batch), self.out_norm, cfg.norm_eps)
        return x if hidden else ops.linear(x, self.output)
