"""The decoder-only transformer every generating family is a variant of, written once against `Ops`.

A family module (llama.py, qwen2.py, qwen3.py, ...) only says how its files describe the model:
which architecture names it answers to, how its config reads into a `DecoderConfig` (the
variant: biases, Q/K norms, extra norms, activation, sliding windows, RoPE bases), and how its
HF tensor names map onto GGUF's. Opening the checkpoint, checking every tensor's shape, and the
forward pass live here, shared by all.

Weights use GGUF's names (llama.cpp's convert_hf_to_gguf.py writes them); an HF checkpoint is
renamed by the family's map.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from llama_engine.errors import ConfigError, UnsupportedArchitectureError, WeightLoadError
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
from llama_models.config_reader import ConfigReader
from llama_models.ops import Ops, RopeSpec, rope_kind

__all__ = ["ACTIVATIONS", "HF_WEIGHTS", "LAYER_EXTRAS", "DecoderConfig", "DecoderModel",
           "fused_refusal", "local_rope", "open_decoder"]

log = logging.getLogger(__name__)

ACTIVATIONS = ("silu", "gelu_tanh")
"""The gated MLP's activations: SiLU (Llama, Qwen, Phi-3, Mistral), GELU-tanh (Gemma)."""

MAX_WINDOW = 1 << 32  # any size of window is harmless: it only ever narrows attention

HF_WEIGHTS: dict[str, str] = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"blk.\1.attn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)": r"blk.\1.attn_q.\2",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)": r"blk.\1.attn_k.\2",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)": r"blk.\1.attn_v.\2",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"blk.\1.attn_output.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight": r"blk.\1.attn_q_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight": r"blk.\1.attn_k_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"blk.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": r"blk.\1.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": r"blk.\1.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": r"blk.\1.ffn_down.weight",
}
"""HF names of the tensors most families share (a family's own map is laid over this one)."""

_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_ROPE_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                           "rope_factors_short.weight"})  # read into the RopeSpec


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """One model's shape and variant. The defaults are the Llama layer: RMSNorm before attention
    and before a SiLU-gated MLP, no biases, global attention, one RoPE table."""

    family: str = "llama"
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
    qkv_bias: bool = False
    """A bias on the Q, K and V products (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of Q and K before RoPE (Qwen3, Gemma 3)."""
    sandwich_norms: bool = False
    """RMSNorm on the attention output and on the MLP output too, before each residual add
    (Gemma 3: post_attention_norm, post_ffw_norm)."""
    activation: str = "silu"
    embed_scale: float = 1.0
    """Embeddings are multiplied by it (Gemma: sqrt(dim))."""
    query_scale: float | None = None
    """Attention scores' scale; None: head_dim ** -0.5."""
    windows: tuple[int, ...] = ()
    """Per layer, the sliding window (a query attends to the last `window` positions, its own
    included) or 0 for global attention; empty: every layer global."""
    local_rope_theta: float | None = None
    """RoPE base of the windowed layers when it differs from the global one (Gemma 3); these
    layers take no RoPE scaling."""

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    @property
    def kv_reach(self) -> int:
        """How many positions back a token attends on every layer: the largest window when
        every layer has one (older K/V can be given back), else 0 (all of them)."""
        if not self.windows or min(self.windows) == 0:
            return 0
        return max(self.windows)

    @property
    def attn_scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, hd, q, kv = self.dim, self.head_dim, self.n_heads * self.head_dim, \
            self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d),
            "output_norm.weight": (d,),
        }
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes |= {
                b + "attn_norm.weight": (d,),
                b + "attn_q.weight": (q, d),
                b + "attn_k.weight": (kv, d),
                b + "attn_v.weight": (kv, d),
                b + "attn_output.weight": (d, q),
                b + "ffn_norm.weight": (d,),
                b + "ffn_gate.weight": (self.ffn_dim, d),
                b + "ffn_up.weight": (self.ffn_dim, d),
                b + "ffn_down.weight": (d, self.ffn_dim),
            }
            if self.qkv_bias:
                shapes |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,),
                           b + "attn_v.bias": (kv,)}
            if self.qk_norm:
                shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)}
            if self.sandwich_norms:
                shapes |= {b + "post_attention_norm.weight": (d,),
                           b + "post_ffw_norm.weight": (d,)}
        return shapes


def local_rope(cfg: DecoderConfig, rope: RopeSpec) -> RopeSpec | None:
    """The windowed layers' own RoPE table (Gemma 3's second base, no scaling), or None when
    every layer rotates by `rope`."""
    if cfg.local_rope_theta is None:
        return None
    return RopeSpec(head_dim=rope.head_dim, rotary_dim=rope.rotary_dim,
                    theta=cfg.local_rope_theta)


def fused_refusal(cfg: DecoderConfig, rope: RopeSpec) -> str | None:
    """Why the fused native step cannot run this model, or None when it can. It runs every
    variant a DecoderConfig describes (biases, Q/K norms, norms after attention and MLP, the
    activations, scaled embeddings, query scales, sliding windows, a second RoPE base, scaled
    RoPE tables), with RoPE over whole heads and widths in whole 32-blocks (its kernels'
    quantization blocks)."""
    if rope.rotary_dim != rope.head_dim:
        return (f"the native kernels rotate whole heads, and this {cfg.family} model rotates "
                f"{rope.rotary_dim} of each head's {rope.head_dim} dimensions")
    widths = {"hidden": cfg.dim, "MLP": cfg.ffn_dim, "attention": cfg.n_heads * cfg.head_dim}
    odd = [f"{name} width {w}" for name, w in widths.items() if w % 32]
    if odd:
        return f"the native kernels take widths in multiples of 32, not this model's " \
            f"{', '.join(odd)}"
    return None


def base_config(r: ConfigReader) -> dict[str, Any]:
    """The fields every family reads the same way, from GGUF keys or config.json keys, as
    DecoderConfig keyword arguments (sliding windows and family options are the family's)."""
    g = r.is_gguf
    for key in (("expert_count",) if g else ("num_local_experts", "num_experts")):
        if r.get(key, 0) not in (0, None):
            raise UnsupportedArchitectureError(
                f"{r.source}: {r.key(key)}={r.get(key)!r}: mixture-of-experts layers are not "
                "supported yet; use a dense model")
    n_heads = r.int("attention.head_count" if g else "num_attention_heads", MAX_HEADS)
    dim = r.int("embedding_length" if g else "hidden_size", MAX_DIM)
    kv_key = "attention.head_count_kv" if g else "num_key_value_heads"
    n_kv = r.int(kv_key, MAX_HEADS, n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{r.source}: {r.key(kv_key)} {n_kv} does not divide the {n_heads} "
                          "attention heads; the file is inconsistent")
    head_key = next((k for k in (("attention.key_length", "rope.dimension_count") if g else
                                 ("head_dim",)) if r.has(k)), None)
    if head_key is not None:
        head_dim = r.int(head_key, MAX_DIM)
    elif dim % n_heads:
        raise ConfigError(f"{r.source}: the width {dim} is not a multiple of the {n_heads} "
                          "heads, and no head width is given; the file is inconsistent")
    else:
        head_dim = dim // n_heads
    if head_dim % 2:
        raise ConfigError(f"{r.source}: the head width {head_dim} is odd; rotary embeddings "
                          "need an even one, the file is inconsistent")
    out = {
        "dim": dim, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
        "n_layers": r.int("block_count" if g else "num_hidden_layers", MAX_LAYERS),
        "ffn_dim": r.int("feed_forward_length" if g else "intermediate_size", MAX_FFN_DIM),
        "context_length": r.int("context_length" if g else "max_position_embeddings",
                                MAX_CONTEXT),
        "norm_eps": r.float("attention.layer_norm_rms_epsilon" if g else "rms_norm_eps", 1e-5,
                            hi=1.0),
        "vocab_size": _vocab_size(r),
    }
    out |= _gguf_rope(r) if g else _hf_rope(r)
    if not g:
        out["tie_embeddings"] = r.bool("tie_word_embeddings", False)
    return out


def refuse_options(r: ConfigReader, family: str, **unsupported_if_true: str) -> None:
    """Refuse, naming it, a config.json option this family's variant does not implement (a
    bias on the output or MLP products, another activation...), rather than run it wrong."""
    for key, what in unsupported_if_true.items():
        if r.get(key, False) not in (False, None):
            raise UnsupportedArchitectureError(
                f"{r.source}: {key}={r.get(key)!r} ({what}) is not supported for {family} "
                "models; use a model without it")


def check_activation(r: ConfigReader, family: str, allowed: tuple[str, ...]) -> None:
    """The MLP activation config.json names (hidden_act, or Gemma's hidden_activation)."""
    if r.is_gguf:
        return
    key = "hidden_activation" if r.has("hidden_activation") else "hidden_act"
    act = r.get(key, allowed[0])
    if act not in allowed:
        raise UnsupportedArchitectureError(
            f"{r.source}: {key}={act!r} is not supported for {family} models (only "
            f"{', '.join(allowed)}); use a model without it")


def _vocab_size(r: ConfigReader) -> int:
    if not r.is_gguf:
        return r.int("vocab_size", MAX_VOCAB)
    if r.has("vocab_size") and r.get("vocab_size") != 0:
        return r.int("vocab_size", MAX_VOCAB)
    tokens = r.values.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConfigError(f"{r.source} gives no vocabulary size ({r.key('vocab_size')})")
    return check_int(len(tokens), "the length of tokenizer.ggml.tokens", r.source,
                     hi=MAX_VOCAB)


def _gguf_rope(r: ConfigReader) -> dict[str, Any]:
    scaling = None
    kind = r.get("rope.scaling.type", None)
    if kind in ("linear", "llama3"):
        scaling = {"rope_type": kind, "factor": r.float("rope.scaling.factor")}
    elif kind not in (None, "none"):
        scaling = {"rope_type": kind}  # refused by RopeSpec.inv_freq, naming it
    return {"rope_theta": r.float("rope.freq_base", 10_000.0), "rope_scaling": scaling}


def hf_rope_parameters(r: ConfigReader) -> tuple[str, dict[str, Any]]:
    """config.json's RoPE object for the global layers, and the key it came from.
    transformers >= 5 writes rope_parameters {rope_type, rope_theta, factor, ...} (per layer
    kind for Gemma 3: the "full_attention" entry); older files have rope_scaling beside
    rope_theta, and a file with both keeps its scaling in rope_scaling."""
    key = "rope_parameters" if r.has("rope_parameters") else "rope_scaling"
    if key == "rope_parameters" and r.has("rope_scaling") and rope_kind(
            _global_layers(r.mapping(key))) in (None, "default"):
        key = "rope_scaling"
    return key, _global_layers(r.mapping(key))


def _global_layers(rope: dict[str, Any]) -> dict[str, Any]:
    inner = rope.get("full_attention")
    return dict(inner) if isinstance(inner, Mapping) else rope


def _hf_rope(r: ConfigReader) -> dict[str, Any]:
    key, rope = hf_rope_parameters(r)
    theta = rope.pop("rope_theta", None)
    if theta is None:  # beside rope_scaling: in rope_parameters, or at the top level
        theta = _global_layers(r.mapping("rope_parameters")).get("rope_theta")
    theta = check_float(theta if theta is not None else r.get("rope_theta", 10_000.0),
                        "rope_theta", r.source)
    if rope_kind(rope) in (None, "default"):
        rope = {}
    if rope_kind(rope) in ("linear", "llama3"):
        check_float(rope.get("factor"), "factor", f"{r.source}: {key}")
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k in rope:
                check_float(rope[k], k, f"{r.source}: {key}")
    return {"rope_theta": theta, "rope_scaling": rope or None}


def hf_windows(r: ConfigReader, n_layers: int, *, default_all: bool) -> tuple[int, ...]:
    """Per-layer windows from config.json: `layer_types` ("sliding_attention" or
    "full_attention" per layer, transformers >= 4.53) with `sliding_window`, else every layer
    windowed when `default_all` and a window is given."""
    window = r.int("sliding_window", MAX_WINDOW, 0, lo=0)
    types = r.get("layer_types", None)
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {
                "sliding_attention", "full_attention"}:
            raise ConfigError(f"{r.source}: layer_types should list 'sliding_attention' or "
                              f"'full_attention' for each of the {n_layers} layers; restore it")
        if window == 0 and "sliding_attention" in types:
            raise ConfigError(f"{r.source}: layer_types has sliding layers but no "
                              "sliding_window; restore the file")
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (window,) * n_layers if default_all and window else ()


def rope_spec(cfg: DecoderConfig, ckpt: Checkpoint) -> RopeSpec:
    """The global layers' rotary table (with rope_freqs.weight's per-frequency divisors, as
    some Llama 3 GGUFs store them); unsupported scalings are refused here, at load."""
    with typed_errors(f"the rotary embedding of {ckpt.path}"):
        factors = None
        if "rope_freqs.weight" in ckpt.tensors:
            t = ckpt.tensors["rope_freqs.weight"]
            if t.qtype not in (0, 1) or t.shape != (cfg.head_dim // 2,):  # F32 or F16
                raise WeightLoadError(
                    f"{ckpt.path}: rope_freqs.weight is type {t.qtype} of shape {t.shape}, not "
                    f"F32 of shape ({cfg.head_dim // 2},); the file is inconsistent")
            factors = tuple(float(x) for x in np.asarray(t.data))
        spec = RopeSpec(head_dim=cfg.head_dim, rotary_dim=cfg.head_dim, theta=cfg.rope_theta,
                        scaling=cfg.rope_scaling, freq_factors=factors)
        spec.inv_freq()
        return spec


def open_decoder(ckpt: Checkpoint, family: ModuleType
                 ) -> tuple[DecoderConfig, RopeSpec, dict[str, RawTensor]]:
    """The checkpoint read as `family`: its checked config, RoPE table and weights under GGUF
    names. Every failure is a `LlamaError`."""
    with typed_errors(f"the configuration of {ckpt.path}"):
        if ckpt.format == "gguf":
            r = ConfigReader.gguf(ckpt.metadata, str(ckpt.path))
        else:
            r = ConfigReader(ckpt.metadata, str(ckpt.path / "config.json"))
        cfg: DecoderConfig = family.config(r)
        if len(cfg.windows) not in (0, cfg.n_layers):
            raise ConfigError(f"{r.source}: {len(cfg.windows)} layer windows for "
                              f"{cfg.n_layers} layers")
        out_name = "output.weight" if ckpt.format == "gguf" else "lm_head.weight"
        cfg = replace(cfg, tie_embeddings=cfg.tie_embeddings or out_name not in ckpt.tensors)
    with typed_errors(f"the rotary embedding of {ckpt.path}"):
        own = getattr(family, "rope_spec", None)  # a family's own scaling (Phi-3's LongRoPE)
        rope = own(cfg, ckpt, r) if own is not None else None
    rope = rope or rope_spec(cfg, ckpt)
    with typed_errors(f"the weights of {ckpt.path}"):
        what = f"a {family.NAME} model"
        if ckpt.format == "hf":
            ckpt = _renamed(ckpt, getattr(family, "HF_PREFIXES", {}))
            named = rename_hf_tensors(ckpt, HF_WEIGHTS | getattr(family, "HF_WEIGHTS", {}),
                                      _HF_IGNORED, what)
        else:
            named = {n: t for n, t in ckpt.tensors.items() if n not in _ROPE_TENSORS}
        adapt = getattr(family, "adapt_weights", None)
        if adapt is not None:
            named = adapt(named, cfg, ckpt.format)
        check_tensors(ckpt.path, named, cfg.expected_shapes(), what,
                      optional=frozenset({"output.weight"}),
                      shapes_from="the model's configuration", order=_natural)
    return cfg, rope, named


def _renamed(ckpt: Checkpoint, prefixes: Mapping[str, str]) -> Checkpoint:
    """`ckpt` with each tensor name's leading `prefixes` key replaced by its value (a family's
    multimodal checkpoint names -> its text model's)."""
    if not prefixes:
        return ckpt

    def rename(name: str) -> str:
        return next((new + name[len(old):] for old, new in prefixes.items()
                     if name.startswith(old)), name)

    return replace(ckpt, tensors={rename(n): t for n, t in ckpt.tensors.items()})


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


_LAYER_WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                  "ffn_gate", "ffn_up", "ffn_down")
LAYER_EXTRAS = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight",
                "attn_k_norm.weight", "post_attention_norm.weight", "post_ffw_norm.weight")
"""A layer's optional tensors beyond the Llama layer (GGUF names after "blk.N."), in the order
of the fused step's Extra (csrc/decode.h)."""


class DecoderModel:
    """The forward pass. `weights` are backend-prepared arrays under GGUF names."""

    def __init__(self, cfg: DecoderConfig, rope: RopeSpec, weights: Mapping[str, Any],
                 ops: Ops) -> None:
        self.cfg, self.rope, self.ops = cfg, rope, ops
        self.local_rope = local_rope(cfg, rope) or rope
        self.embed = weights["token_embd.weight"]
        self.out_norm = weights["output_norm.weight"]
        self.output = weights.get("output.weight", self.embed)
        self.layers: list[dict[str, Any]] = []
        for i in range(cfg.n_layers):
            w = {k: weights[f"blk.{i}.{k}.weight"] for k in _LAYER_WEIGHTS}
            w |= {k: weights[f"blk.{i}.{k}"] for k in LAYER_EXTRAS
                  if f"blk.{i}.{k}" in weights}
            self.layers.append(w)
        self.act = ops.silu if cfg.activation == "silu" else (
            lambda x: ops.gelu(x, approximate=True))

    def forward(self, tokens: Any, positions: Any, batch: Any, *, hidden: bool = False) -> Any:
        """tokens, positions: [N]; returns logits [M, vocab] for the rows batch asks for, or
        with `hidden` their final-normed hidden states [M, dim] (for embeddings)."""
        ops, cfg = self.ops, self.cfg
        n, eps = tokens.shape[0], cfg.norm_eps
        rot = ops.rotary(positions, self.rope)
        local_rot = rot if self.local_rope is self.rope else ops.rotary(positions, self.local_rope)
        x = ops.embedding(self.embed, tokens)
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        for i, w in enumerate(self.layers):
            window = cfg.window(i)
            h = ops.rms_norm(x, w["attn_norm"], eps)
            q, k, v = (ops.linear(h, w[name]) for name in ("attn_q", "attn_k", "attn_v"))
            if cfg.qkv_bias:
                q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
            q = q.reshape(n, cfg.n_heads, cfg.head_dim)
            k = k.reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = v.reshape(n, cfg.n_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = ops.rms_norm(q, w["attn_q_norm.weight"], eps)
                k = ops.rms_norm(k, w["attn_k_norm.weight"], eps)
            r = local_rot if window else rot
            a = ops.attention(ops.rope(q, r), ops.rope(k, r), v, batch, i, cfg.attn_scale,
                              window=window)
            a = ops.linear(a, w["attn_output"])
            if cfg.sandwich_norms:
                a = ops.rms_norm(a, w["post_attention_norm.weight"], eps)
            x = x + a
            h = ops.rms_norm(x, w["ffn_norm"], eps)
            m = ops.linear(self.act(ops.linear(h, w["ffn_gate"])) * ops.linear(h, w["ffn_up"]),
                           w["ffn_down"])
            if cfg.sandwich_norms:
                m = ops.rms_norm(m, w["post_ffw_norm.weight"], eps)
            x = x + m
        x = ops.rms_norm(ops.take_rows(x, batch), self.out_norm, eps)
        return x if hidden else ops.linear(x, self.output)
