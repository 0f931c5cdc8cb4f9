"""BERT-family sentence encoders (all-MiniLM, BGE, E5, ...), written once against `Ops`.

References: Devlin et al. 2019 (BERT), Reimers & Gurevych 2019 (Sentence-BERT), and the layout
sentence-transformers saves: `modules.json` lists the pipeline (Transformer, Pooling, Normalize),
`sentence_bert_config.json` the maximum sequence length, `1_Pooling/config.json` the pooling mode.
Weights use llama.cpp's GGUF names for BERT; HF checkpoints are renamed by WEIGHT_MAP.

A forward takes a padded batch: ids [B, T] and a bool mask [B, T] (True = a real token, padding
on the right). Layers are post-norm: x = LN(x + Attn(x)); x = LN(x + FFN(x)).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llama_engine.errors import ConfigError, UnsupportedArchitectureError
from llama_models.checkpoint import (
    MAX_CONFIG_BYTES,
    MAX_CONTEXT,
    MAX_DIM,
    MAX_FFN_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    Checkpoint,
    RawTensor,
    check_int,
    check_tensors,
    read_hf_dir,
    rename_hf_tensors,
    typed_errors,
)
from llama_models.config_reader import ConfigReader
from llama_models.ops import POOLING_MODES, Ops
from llama_models.registry import resolve_model_path

__all__ = [
    "HF_ARCHITECTURES",
    "WEIGHT_MAP",
    "BertConfig",
    "BertModel",
    "EncoderFiles",
    "SentenceConfig",
    "load_weights",
    "open_encoder",
    "read_sentence_config",
]

HF_ARCHITECTURES = ("bert",)

_P = r"(?:bert\.)?"  # BertForX checkpoints prefix the encoder's names
_NORM = r"LayerNorm\.(?:weight|gamma)"
_BIAS = r"LayerNorm\.(?:bias|beta)"
_LAYER = _P + r"encoder\.layer\.(\d+)\."
WEIGHT_MAP: dict[str, str] = {
    _P + r"embeddings\.word_embeddings\.weight": "token_embd.weight",
    _P + r"embeddings\.position_embeddings\.weight": "position_embd.weight",
    _P + r"embeddings\.token_type_embeddings\.weight": "token_types.weight",
    _P + r"embeddings\." + _NORM: "token_embd_norm.weight",
    _P + r"embeddings\." + _BIAS: "token_embd_norm.bias",
    _LAYER + r"attention\.self\.query\.(weight|bias)": r"blk.\1.attn_q.\2",
    _LAYER + r"attention\.self\.key\.(weight|bias)": r"blk.\1.attn_k.\2",
    _LAYER + r"attention\.self\.value\.(weight|bias)": r"blk.\1.attn_v.\2",
    _LAYER + r"attention\.output\.dense\.(weight|bias)": r"blk.\1.attn_output.\2",
    _LAYER + r"attention\.output\." + _NORM: r"blk.\1.attn_output_norm.weight",
    _LAYER + r"attention\.output\." + _BIAS: r"blk.\1.attn_output_norm.bias",
    _LAYER + r"intermediate\.dense\.(weight|bias)": r"blk.\1.ffn_up.\2",
    _LAYER + r"output\.dense\.(weight|bias)": r"blk.\1.ffn_down.\2",
    _LAYER + r"output\." + _NORM: r"blk.\1.layer_output_norm.weight",
    _LAYER + r"output\." + _BIAS: r"blk.\1.layer_output_norm.bias",
}
# position ids buffer, the pooler (sentence-transformers pools itself) and pre-training heads
_HF_IGNORED = re.compile(_P + r"(?:embeddings\.position_ids|pooler\..*)|cls\..*")
_LAYER_KEYS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up",
               "ffn_down", "layer_output_norm")
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
"""hidden_act -> whether it is the tanh approximation."""


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_positions: int
    type_vocab_size: int
    norm_eps: float = 1e-12
    gelu_tanh: bool = False
    """hidden_act is a tanh-approximated GELU (gelu_new), not the erf one."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        r = ConfigReader(cfg, source)
        act = r.get("hidden_act", "gelu")
        if not isinstance(act, str) or act not in _GELU:
            raise UnsupportedArchitectureError(
                f"{source}: hidden_act {act!r} is not supported (only {', '.join(_GELU)}); use "
                "another model")
        kind = r.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise UnsupportedArchitectureError(
                f"{source}: position_embedding_type {kind!r} is not supported (only absolute)")
        dim, heads = r.int("hidden_size", MAX_DIM), r.int("num_attention_heads", MAX_HEADS)
        if dim % heads:
            raise ConfigError(f"{source}: hidden_size {dim} is not a multiple of "
                              f"num_attention_heads {heads}; the file is inconsistent")
        return cls(
            vocab_size=r.int("vocab_size", MAX_VOCAB),
            dim=dim,
            n_layers=r.int("num_hidden_layers", MAX_LAYERS),
            n_heads=heads,
            ffn_dim=r.int("intermediate_size", MAX_FFN_DIM),
            max_positions=r.int("max_position_embeddings", MAX_CONTEXT),
            type_vocab_size=r.int("type_vocab_size", MAX_VOCAB, 2),
            norm_eps=r.float("layer_norm_eps", 1e-12, hi=1.0),
            gelu_tanh=_GELU[act],
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.dim, self.ffn_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d),
            "position_embd.weight": (self.max_positions, d),
            "token_types.weight": (self.type_vocab_size, d),
            "token_embd_norm.weight": (d,),
            "token_embd_norm.bias": (d,),
        }
        per_layer = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
                     "attn_output_norm": (d,), "ffn_up": (f, d), "ffn_down": (d, f),
                     "layer_output_norm": (d,)}
        for i in range(self.n_layers):
            for key, shape in per_layer.items():
                shapes[f"blk.{i}.{key}.weight"] = shape
                shapes[f"blk.{i}.{key}.bias"] = (shape[0],)
        return shapes


@dataclass(frozen=True, kw_only=True)
class SentenceConfig:
    """The sentence-transformers pipeline around the encoder, read from the model's own files."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int = 512
    do_lower_case: bool = False
    transformer_dir: Path | None = None
    """Where config.json, the weights and the tokenizer live (the Transformer module's path)."""


def read_sentence_config(path: Path) -> SentenceConfig:
    """The pipeline of a sentence-transformers directory; a plain HF BERT directory gets what
    sentence-transformers gives one: mean pooling, no normalization."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return SentenceConfig(max_seq_length=_default_max_len(path), transformer_dir=path)
    modules = _json(modules_file)
    if not isinstance(modules, list):
        raise ConfigError(f"{modules_file} should hold a list of modules; restore the file")
    transformer_dir: Path | None = None
    pooling: tuple[str, ...] | None = None
    normalize = False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, Mapping) else ""
        sub = path / str(m.get("path", "")) if isinstance(m, Mapping) else path
        if kind == "Transformer" and transformer_dir is None:
            transformer_dir = sub
        elif kind == "Pooling" and pooling is None:
            pooling = _pooling_modes(sub / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise UnsupportedArchitectureError(
                f"{modules_file} lists a {kind or m!r} module; llama-engine runs sentence-"
                "transformers pipelines of Transformer, Pooling and Normalize modules only")
    if transformer_dir is None:
        raise ConfigError(f"{modules_file} has no Transformer module; restore the file")
    st_file = transformer_dir / "sentence_bert_config.json"
    st = _json(st_file) if st_file.is_file() else {}
    if not isinstance(st, Mapping):
        raise ConfigError(f"{st_file} should hold a JSON object; restore the file")
    tok_args = st.get("processor_kwargs") or st.get("tokenizer_args") or {}
    max_len = st.get("max_seq_length") or (
        tok_args.get("model_max_length") if isinstance(tok_args, Mapping) else None)
    return SentenceConfig(
        pooling=pooling or ("mean",),
        normalize=normalize,
        max_seq_length=(check_int(max_len, "max_seq_length", str(st_file), hi=MAX_CONTEXT)
                        if max_len else _default_max_len(transformer_dir)),
        do_lower_case=bool(st.get("do_lower_case", False)),
        transformer_dir=transformer_dir,
    )


def _pooling_modes(file: Path) -> tuple[str, ...]:
    """Both spellings: `pooling_mode` (a name or a list, sentence-transformers >= 6) or the
    older `pooling_mode_*` booleans, concatenated in sentence-transformers' order."""
    cfg = _json(file) if file.is_file() else {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{file} should hold a JSON object; restore the file")
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        modes: tuple[str, ...] = (mode,)
    elif isinstance(mode, list):
        modes = tuple(str(m) for m in mode)
    else:
        legacy = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean",
                  "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "weightedmean_tokens": "weightedmean", "lasttoken": "lasttoken"}
        modes = tuple(v for k, v in legacy.items() if cfg.get(f"pooling_mode_{k}"))
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise UnsupportedArchitectureError(
            f"{file}: pooling mode {bad[0]!r} is not supported; use one of "
            f"{', '.join(POOLING_MODES)}")
    return modes or ("mean",)


def _default_max_len(path: Path) -> int:
    """No length in sentence_bert_config.json: the tokenizer's model_max_length (where
    sentence-transformers >= 6 saves it), at most the position table."""
    cfg = _json(path / "config.json") if (path / "config.json").is_file() else {}
    limit = (check_int(cfg.get("max_position_embeddings", 512), "max_position_embeddings",
                       str(path / "config.json"), hi=MAX_CONTEXT)
             if isinstance(cfg, Mapping) else 512)
    tok_file = path / "tokenizer_config.json"
    tok = _json(tok_file) if tok_file.is_file() else {}
    tok_max = tok.get("model_max_length") if isinstance(tok, Mapping) else None
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        return tok_max
    return limit


def _json(file: Path) -> Any:
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{file} is larger than the {MAX_CONFIG_BYTES} bytes a "
                              "configuration file may have; restore the file")
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); restore the file") from e


def load_weights(ckpt: Checkpoint, cfg: BertConfig) -> dict[str, RawTensor]:
    """The checkpoint's tensors under GGUF names, every name and shape checked."""
    named = rename_hf_tensors(ckpt, WEIGHT_MAP, _HF_IGNORED, "a BERT model")
    check_tensors(ckpt.path, named, cfg.expected_shapes(), "a BERT model")
    return named


@dataclass(kw_only=True)
class EncoderFiles:
    """An encoder checkpoint with its configuration, pipeline and checked raw weights."""

    name: str
    checkpoint: Checkpoint
    config: BertConfig
    sentence: SentenceConfig
    weights: dict[str, RawTensor]

    @property
    def dim(self) -> int:
        """Length of one embedding (pooled modes are concatenated)."""
        return self.config.dim * len(self.sentence.pooling)

    def build(self, prepared: Mapping[str, Any], ops: Ops) -> BertModel:
        return BertModel(self.config, self.sentence, prepared, ops)


def open_encoder(model: str) -> EncoderFiles:
    """Resolve a registered name or a path to a sentence-transformers (or plain HF BERT)
    directory, and read and check it; every failure is a `LlamaError`."""
    with typed_errors(f"embedding model {model!r}"):
        return _open_encoder(model)


def _open_encoder(model: str) -> EncoderFiles:
    path = resolve_model_path(model)
    if not path.is_dir():
        raise UnsupportedArchitectureError(
            f"{path} is a file; an embedding model is a sentence-transformers or Hugging Face "
            "BERT directory (config.json + model.safetensors + tokenizer.json)")
    sentence = read_sentence_config(path)
    assert sentence.transformer_dir is not None
    ckpt = read_hf_dir(sentence.transformer_dir)
    if ckpt.architecture not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} is a {ckpt.architecture!r} model; embeddings run BERT-family encoders "
            f"({', '.join(HF_ARCHITECTURES)}) so far. Use such a model as embed_model")
    cfg = BertConfig.from_hf(ckpt.metadata, str(sentence.transformer_dir / "config.json"))
    if sentence.max_seq_length > cfg.max_positions:
        sentence = replace(sentence, max_seq_length=cfg.max_positions)
    return EncoderFiles(name=model, checkpoint=ckpt, config=cfg, sentence=sentence,
                        weights=load_weights(ckpt, cfg))


class BertModel:
    """The forward pass and the sentence pipeline. `weights` are backend-prepared arrays."""

    def __init__(self, cfg: BertConfig, sentence: SentenceConfig, weights: Mapping[str, Any],
                 ops: Ops) -> None:
        self.cfg, self.sentence, self.ops = cfg, sentence, ops
        self.tok_embd = weights["token_embd.weight"]
        self.pos_embd = weights["position_embd.weight"]
        self.type0 = weights["token_types.weight"][0]  # every token is of segment 0
        self.embd_norm = (weights["token_embd_norm.weight"], weights["token_embd_norm.bias"])
        self.layers = [
            {f"{k}.{p}": weights[f"blk.{i}.{k}.{p}"] for k in _LAYER_KEYS
             for p in ("weight", "bias")}
            for i in range(cfg.n_layers)
        ]
        self.scale = cfg.head_dim ** -0.5

    def forward(self, ids: Any, mask: Any) -> Any:
        """ids, mask: [B, T] -> last hidden states [B, T, dim]."""
        ops, cfg = self.ops, self.cfg
        b, t = ids.shape
        h, hd, eps = cfg.n_heads, cfg.head_dim, cfg.norm_eps
        x = ops.embedding(self.tok_embd, ids) + self.pos_embd[:t] + self.type0
        x = ops.layer_norm(x, *self.embd_norm, eps)
        keys = ops.key_mask(mask)
        for w in self.layers:
            q = ops.linear_bias(x, w["attn_q.weight"], w["attn_q.bias"]).reshape(b, t, h, hd)
            k = ops.linear_bias(x, w["attn_k.weight"], w["attn_k.bias"]).reshape(b, t, h, hd)
            v = ops.linear_bias(x, w["attn_v.weight"], w["attn_v.bias"]).reshape(b, t, h, hd)
            a = ops.encoder_attention(q, k, v, keys, self.scale)
            a = ops.linear_bias(a, w["attn_output.weight"], w["attn_output.bias"])
            x = ops.layer_norm(x + a, w["attn_output_norm.weight"], w["attn_output_norm.bias"],
                               eps)
            f = ops.gelu(ops.linear_bias(x, w["ffn_up.weight"], w["ffn_up.bias"]),
                         cfg.gelu_tanh)
            f = ops.linear_bias(f, w["ffn_down.weight"], w["ffn_down.bias"])
            x = ops.layer_norm(x + f, w["layer_output_norm.weight"], w["layer_output_norm.bias"],
                               eps)
        return x

    def embed(self, ids: Any, mask: Any) -> Any:
        """ids, mask: [B, T] -> sentence embeddings [B, dim], pooled (and normalized) as the
        model's sentence-transformers configuration says."""
        pooled = self.ops.pool(self.forward(ids, mask), mask, self.sentence.pooling)
        return self.ops.l2_normalize(pooled) if self.sentence.normalize else pooled
