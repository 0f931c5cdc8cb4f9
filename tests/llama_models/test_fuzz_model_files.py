"""Opening a malformed model file is bounded and typed: GGUF headers and metadata (hand-packed
here, so any count, type or nesting can be written), bit flips of a real GGUF's header, and
HF config.json values of the wrong type. Each case ends, within seconds and without a memory
blow-up, in a `LlamaError` or in a model that opened.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bounded_calls import (
    FUZZ,
    bounded,
    check_named_case,
    check_worst_cases_in_a_fresh_process,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_engine.errors import ConfigError, LlamaError, WeightLoadError
from llama_models import ModelFiles, open_model
from llama_models.bert import BertConfig
from llama_tokenizer import Tokenizer

# -- hand-packing GGUF files ---------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


@dataclass(frozen=True)
class Raw:
    """A metadata value written as given: its type id and payload bytes."""

    vtype: int
    payload: bytes


def pstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def pack_value(v: Any) -> tuple[int, bytes]:
    if isinstance(v, Raw):
        return v.vtype, v.payload
    if isinstance(v, bool):
        return BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        if 0 <= v < 1 << 32:
            return U32, struct.pack("<I", v)
        if -(1 << 63) <= v < 0:
            return I64, struct.pack("<q", v)
        return U64, struct.pack("<Q", v % (1 << 64))
    if isinstance(v, float):
        return F32, struct.pack("<f", v)
    if isinstance(v, str):
        return STRING, pstr(v)
    if isinstance(v, list):
        etype = pack_value(v[0])[0] if v else U8
        body = b"".join(pack_value(x)[1] for x in v)
        return ARRAY, struct.pack("<IQ", etype, len(v)) + body
    raise TypeError(v)


def pack_gguf(kv: dict[str, Any], tensors: dict[str, np.ndarray] | None = None, *,
              version: int = 3, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    tensors = tensors or {}
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, value in kv.items():
        vtype, payload = pack_value(value)
        out += pstr(key) + struct.pack("<I", vtype) + payload
    blobs, offset = [], 0
    for name, a in tensors.items():
        out += pstr(name) + struct.pack("<I", a.ndim)
        out += b"".join(struct.pack("<Q", d) for d in reversed(a.shape))
        out += struct.pack("<IQ", 0, offset)  # F32
        blob = a.astype("<f4").tobytes()
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    return out + b"".join(blobs)


SPACE = "\u2581"
TOKENS = ["<unk>", "<s>", "</s>", SPACE, "a", "b", "c", "ab", "bc", f"{SPACE}a", f"{SPACE}ab",
          "abc", "ca", "cab", f"{SPACE}c", "<|im_end|>"]


def tiny_llama_kv() -> dict[str, Any]:
    """A 1-layer Llama (dim 8, 2 heads, 1 KV head) with a 16-token SentencePiece vocabulary."""
    return {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": len(TOKENS),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [-float(i) for i in range(len(TOKENS) - 3)],
        "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(TOKENS) - 4) + [3],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def tiny_llama_tensors(n_layers: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    out = {"token_embd.weight": w(len(TOKENS), 8), "output_norm.weight": np.ones(8, np.float32)}
    for i in range(n_layers):
        out |= {
            f"blk.{i}.attn_norm.weight": np.ones(8, np.float32),
            f"blk.{i}.attn_q.weight": w(8, 8),
            f"blk.{i}.attn_k.weight": w(4, 8),
            f"blk.{i}.attn_v.weight": w(4, 8),
            f"blk.{i}.attn_output.weight": w(8, 8),
            f"blk.{i}.ffn_norm.weight": np.ones(8, np.float32),
            f"blk.{i}.ffn_gate.weight": w(16, 8),
            f"blk.{i}.ffn_up.weight": w(16, 8),
            f"blk.{i}.ffn_down.weight": w(8, 16),
        }
    return out


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def open_checked(path: str) -> ModelFiles | LlamaError:
    """open_model within the bounds; when it opens, its GGUF tokenizer is built too."""
    result = bounded(lambda: open_model(path))
    if isinstance(result, ModelFiles) and result.checkpoint.format == "gguf":
        tok = bounded(lambda: Tokenizer.from_gguf_metadata(result.checkpoint.metadata))
        assert isinstance(tok, Tokenizer | LlamaError)
    assert isinstance(result, ModelFiles | LlamaError), result
    return result


def test_the_hand_packed_tiny_model_opens(tmp_path: Path) -> None:
    import gguf

    path = write(tmp_path / "tiny.gguf", pack_gguf(tiny_llama_kv(), tiny_llama_tensors()))
    files = open_model(path)
    assert (files.config.n_layers, files.config.head_dim, files.config.n_kv_heads) == (1, 4, 1)
    assert len(gguf.GGUFReader(path).tensors) == 11  # gguf-py reads the packing too
    tok = Tokenizer.from_gguf_metadata(files.checkpoint.metadata)
    assert tok.vocab_size == len(TOKENS)


# -- the cases named in the issue, one by one ---------------------------------------------------
def case_block_count_million(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    kv = tiny_llama_kv() | {"llama.block_count": 10**6}
    path = write(tmp / "layers.gguf", pack_gguf(kv, tiny_llama_tensors()))
    return lambda: open_model(path), ConfigError, r"llama\.block_count is 1000000, outside"


def case_head_count_zero(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    kv = tiny_llama_kv() | {"llama.attention.head_count": 0}
    path = write(tmp / "heads.gguf", pack_gguf(kv, tiny_llama_tensors()))
    return lambda: open_model(path), ConfigError, r"llama\.attention\.head_count is 0"


def case_embedding_length_text(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    kv = tiny_llama_kv() | {"llama.embedding_length": "eight"}
    path = write(tmp / "dim.gguf", pack_gguf(kv, tiny_llama_tensors()))
    return (lambda: open_model(path), ConfigError,
            r"dim\.gguf: llama\.embedding_length should be an integer, got 'eight'")


def case_nested_arrays(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    depth = 100_000  # one array inside the next: 12 bytes a level
    nested = struct.pack("<IQ", ARRAY, 1) * depth + struct.pack("<IQ", U8, 0)
    kv = tiny_llama_kv() | {"general.tags": Raw(ARRAY, nested)}
    path = write(tmp / "nested.gguf", pack_gguf(kv, tiny_llama_tensors()))
    return lambda: open_model(path), WeightLoadError, "nested more than 3 deep"


def case_tensor_count(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    path = write(tmp / "tensors.gguf", pack_gguf(tiny_llama_kv(), n_tensors=10**9))
    return lambda: open_model(path), WeightLoadError, "tensor count is 1000000000, more than"


def case_kv_count(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    path = write(tmp / "keys.gguf", pack_gguf(tiny_llama_kv(), n_kv=60_000))
    return lambda: open_model(path), WeightLoadError, "metadata key count is 60000, which needs"


def case_array_length(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    kv = tiny_llama_kv() | {"tokenizer.ggml.scores": Raw(ARRAY, struct.pack("<IQ", F32, 2**40))}
    path = write(tmp / "array.gguf", pack_gguf(kv))
    return lambda: open_model(path), WeightLoadError, "array's length is 1099511627776"


def case_string_length(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    kv = tiny_llama_kv() | {"general.name": Raw(STRING, struct.pack("<Q", 2**62) + b"x")}
    path = write(tmp / "string.gguf", pack_gguf(kv))
    return lambda: open_model(path), WeightLoadError, "bytes long, more than the 67108864"


def case_hf_hidden_size_text(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    d = tiny_hf_dir(tmp / "hf")
    (d / "config.json").write_text(json.dumps(HF_CONFIG | {"hidden_size": "8"}))
    return (lambda: open_model(str(d)), ConfigError,
            r"config\.json: hidden_size should be an integer, got '8'")


def case_hf_nested_json(tmp: Path) -> tuple[Callable[[], Any], type, str]:
    d = tiny_hf_dir(tmp / "hf")
    (d / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return lambda: open_model(str(d)), WeightLoadError, r"config\.json is not valid JSON"


WORST_CASES: dict[str, Callable[[Path], tuple[Callable[[], Any], type, str]]] = {
    f.__name__.removeprefix("case_"): f
    for f in (case_block_count_million, case_head_count_zero, case_embedding_length_text,
              case_nested_arrays, case_tensor_count, case_kv_count, case_array_length,
              case_string_length, case_hf_hidden_size_text, case_hf_nested_json)
}


@pytest.mark.parametrize("name", list(WORST_CASES))
def test_named_case_is_refused_with_a_typed_error(name: str, tmp_path: Path) -> None:
    check_named_case(WORST_CASES[name], tmp_path)


def test_named_cases_stay_small_in_a_fresh_process(tmp_path: Path) -> None:
    """ru_maxrss is a high-water mark, so measure each worst case where nothing came before:
    a fresh interpreter, with its address space capped at 4 GiB in case a bound is missing."""
    check_worst_cases_in_a_fresh_process(__file__, tmp_path, 'llama_models.llama, torch')


# -- fuzzing GGUF metadata and headers -----------------------------------------------------------
KNOWN_KEYS = [
    "general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
    "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
    "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base", "llama.vocab_size", "llama.attention.key_length",
    "llama.rope.dimension_count", "llama.attention.sliding_window", "llama.rope.scaling.type",
    "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
]
EDGES = [0, 1, 2, 3, 7, 8, 16, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]
BIG_INTS = st.sampled_from([*EDGES, -1, -(2**63)])
COUNTS = st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1))
"""what a u64 count or length field can hold"""
scalars = st.one_of(
    BIG_INTS,
    st.integers(-(2**63), 2**64 - 1),
    st.floats(width=32),
    st.booleans(),
    st.text(max_size=12),
)
homogeneous_lists = st.one_of(
    st.lists(st.integers(0, 2**32 - 1), max_size=20),
    st.lists(st.floats(width=32), max_size=20),
    st.lists(st.text(max_size=8), max_size=20),
)
nested_lists = st.recursive(homogeneous_lists, lambda inner: st.lists(inner, min_size=1,
                                                                      max_size=3), max_leaves=8)
raw_values = st.builds(
    Raw,
    st.integers(0, 15),
    st.one_of(
        st.binary(max_size=40),
        st.builds(lambda t, n, tail: struct.pack("<IQ", t, n) + tail, st.integers(0, 15),
                  COUNTS, st.binary(max_size=24)),
        st.builds(lambda n, tail: struct.pack("<Q", n) + tail, COUNTS, st.binary(max_size=24)),
    ),
)
values = st.one_of(scalars, nested_lists, raw_values)
MISSING = object()


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(KNOWN_KEYS), st.one_of(values, st.just(MISSING)),
                             min_size=1, max_size=3))
def test_fuzzed_known_keys(edits: dict[str, Any], tmp_path: Path) -> None:
    kv = tiny_llama_kv()
    for key, value in edits.items():
        if value is MISSING:
            kv.pop(key, None)
        else:
            kv[key] = value
    open_checked(write(tmp_path / "fuzz.gguf", pack_gguf(kv, tiny_llama_tensors())))


@FUZZ
@given(
    version=st.sampled_from([3, 3, 3, 2, 1, 4, 2**32 - 1]),
    n_kv=st.one_of(st.none(), COUNTS),
    n_tensors=st.one_of(st.none(), COUNTS),
    extra=st.dictionaries(st.text(max_size=10), values, max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_fuzzed_headers(version: int, n_kv: int | None, n_tensors: int | None,
                        extra: dict[str, Any], cut: float | None, tmp_path: Path) -> None:
    data = pack_gguf(tiny_llama_kv() | extra, tiny_llama_tensors(), version=version, n_kv=n_kv,
                     n_tensors=n_tensors)
    if cut is not None:
        data = data[: int(len(data) * cut)]
    open_checked(write(tmp_path / "fuzz.gguf", data))


@pytest.fixture(scope="module")
def tiny_bytes() -> bytes:
    return pack_gguf(tiny_llama_kv(), tiny_llama_tensors(2))


@FUZZ
@given(data=st.data())
def test_bit_flips_and_truncation_of_a_valid_file(data: st.DataObject, tiny_bytes: bytes,
                                                   tmp_path: Path) -> None:
    buf = bytearray(tiny_bytes)
    header = tiny_bytes.index(b"token_embd.weight") + 600  # metadata and tensor infos
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header))
        if data.draw(st.booleans()):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            buf[pos] = data.draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    open_checked(write(tmp_path / "fuzz.gguf", bytes(buf)))


@pytest.fixture(scope="module")
def smollm2_header() -> tuple[bytes, int]:
    """The metadata and tensor table of the real SmolLM2 GGUF, and the file's size."""
    from llama_models import resolve_model_path
    from llama_models.gguf_file import read_gguf_file

    path = resolve_model_path("smollm2-135m-instruct")
    _, tensors = read_gguf_file(path)
    with open(path, "rb") as f:
        return f.read(min(t.offset for t in tensors)), path.stat().st_size


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_bit_flips_of_a_real_gguf_header(data: st.DataObject, smollm2_header: tuple[bytes, int],
                                        tmp_path: Path) -> None:
    """Flips in SmolLM2's metadata and tensor table, in the first 4 KB (counts, keys, scalars,
    the vocabulary's array header) or anywhere (tokens, merges, tensor infos); the rest of the
    file is kept as a sparse file of zeros of the real size, so an intact header opens."""
    header, size = smollm2_header
    buf = bytearray(header)
    end = data.draw(st.sampled_from([4096, len(header) - 1]))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, end))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "smollm2.gguf"
    with open(path, "wb") as f:
        f.write(buf)
        f.truncate(size)
    open_checked(str(path))


# -- HF directories ------------------------------------------------------------------------------
HF_CONFIG: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def tiny_hf_dir(d: Path) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight"}
    hf = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for name, a in tiny_llama_tensors().items():
        if name in names:
            tensors[names[name]] = a
        else:
            _, i, key, _ = name.split(".")
            tensors[f"model.layers.{i}.{hf[key]}.weight"] = a
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("hf"))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), BIG_INTS, st.integers(), st.floats(),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
HF_KEYS = [*HF_CONFIG, "head_dim", "sliding_window", "rope_scaling", "rope_parameters",
           "architectures"]


@settings(FUZZ, max_examples=40)
@given(edits=st.dictionaries(st.sampled_from(HF_KEYS), st.one_of(json_values, st.just(MISSING)),
                             min_size=1, max_size=3),
       rope=st.sampled_from([None, "linear", "llama3", "yarn"]))
def test_fuzzed_hf_config(edits: dict[str, Any], rope: str | None, hf_dir: Path) -> None:
    cfg = dict(HF_CONFIG)
    for key, value in edits.items():
        if value is MISSING:
            cfg.pop(key, None)
        elif key in ("rope_scaling", "rope_parameters") and rope and isinstance(value, dict):
            cfg[key] = {**value, "rope_type": rope}
        else:
            cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    open_checked(str(hf_dir))


@settings(FUZZ, max_examples=80)
@given(edits=st.dictionaries(
    st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                     "layer_norm_eps", "hidden_act", "position_embedding_type"]),
    json_values, min_size=1, max_size=3))
def test_fuzzed_bert_config(edits: dict[str, Any]) -> None:
    cfg = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "max_position_embeddings": 32} | edits
    result = bounded(lambda: BertConfig.from_hf(cfg))
    assert isinstance(result, BertConfig | LlamaError), result
    if isinstance(result, BertConfig):
        assert 0 < result.n_layers <= 1024 and result.dim % result.n_heads == 0
