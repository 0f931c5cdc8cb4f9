"""Opening a malformed tokenizer is bounded and typed: tokenizer.json files with huge ids,
missing fields and wrong types, GGUF vocabularies with huge tokens or too many of them, and
garbage or bit-flipped SentencePiece models. Each case ends, within seconds and without a memory
blow-up, in a `LlamaError` or in a tokenizer that encodes and decodes.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from llama_tokenizer import Tokenizer
from llama_tokenizer._pieces import bytes_to_unicode

SPACE = "\u2581"


def open_checked(call: Callable[[], Tokenizer]) -> Tokenizer | LlamaError:
    """A tokenizer that opened must also encode and decode."""
    result = bounded(call)
    assert isinstance(result, Tokenizer | LlamaError), result
    if isinstance(result, Tokenizer):
        ids = bounded(lambda: result.encode("hello abc <s> ab"))
        if not isinstance(ids, LlamaError):
            assert all(0 <= i < result.vocab_size for i in ids)
            assert isinstance(result.decode(ids), str)
    return result


# -- sources -------------------------------------------------------------------------------------
def spm_meta() -> dict[str, Any]:
    pieces = [SPACE, "a", "b", "c", "ab", "bc", f"{SPACE}a", f"{SPACE}ab", "abc", "hello"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def byte_level_meta() -> dict[str, Any]:
    alphabet = list(bytes_to_unicode().values())
    merged = ["he", "ll", "hell", "hello"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *merged]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def bpe_json() -> dict[str, Any]:
    """A byte-level BPE tokenizer.json written by `tokenizers` itself."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"he": 256, "ll": 257, "hell": 258}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("he", "ll")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return json.loads(tok.to_str())


def wordpiece_json() -> dict[str, Any]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "hello", "a", "##b", "##c"])}
    tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return json.loads(tok.to_str())


def unigram_json() -> dict[str, Any]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = [("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5), ("hello", -3.0)]
    return json.loads(HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False)).to_str())


def write_json(path: Path, spec: Any) -> Path:
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def from_json(path: Path) -> Callable[[], Tokenizer]:
    return lambda: Tokenizer.from_tokenizer_json(path)


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog", "hello world"] * 40),
        model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def test_the_sources_open(tmp_path: Path, spm_model: bytes) -> None:
    for meta in (spm_meta(), byte_level_meta()):
        assert Tokenizer.from_gguf_metadata(meta).encode("hello", add_special=False)
    for spec in (bpe_json(), wordpiece_json(), unigram_json()):
        tok = Tokenizer.from_tokenizer_json(write_json(tmp_path / "tokenizer.json", spec))
        assert tok.encode("hello", add_special=False)
    (tmp_path / "sp.model").write_bytes(spm_model)
    assert Tokenizer.from_sentencepiece(tmp_path / "sp.model").encode("hello")


# -- the cases named in the issue, one by one ---------------------------------------------------
Case = tuple[Callable[[], Any], type, str]


def gguf_vocab_file(path: Path, tokens: list[str], types: list[int] | None = None) -> Path:
    """A GGUF holding only a "llama" vocabulary, written by gguf-py."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types or [1] * len(tokens))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def from_gguf_file(path: Path) -> Callable[[], Tokenizer]:
    def call() -> Tokenizer:
        from llama_models.gguf_file import read_gguf_file

        meta, _ = read_gguf_file(path)
        return Tokenizer.from_gguf_metadata(meta)

    return call


def case_ever_longer_tokens(tmp: Path) -> Case:
    tokens = ["a" * k for k in range(1, 2000)]  # 2 MB, every split of every token a merge
    path = gguf_vocab_file(tmp / "longer.gguf", tokens)
    return from_gguf_file(path), ConfigError, "is 1025 bytes long, more than the 1024"


def case_ever_longer_short_tokens(tmp: Path) -> Case:
    tokens = [c * k for c in "abcd" for k in range(1, 1001)]  # 2 MB, each token <= 1000 bytes
    path = gguf_vocab_file(tmp / "runs.gguf", tokens)
    return from_gguf_file(path), ConfigError, "splits into more than .* BPE merges"


def case_control_tokens(tmp: Path) -> Case:
    tokens = [f"<{i:05d}{'x' * 900}>" for i in range(2000)]
    path = gguf_vocab_file(tmp / "control.gguf", tokens, [3] * len(tokens))
    return from_gguf_file(path), ConfigError, "control and user-defined tokens hold 1814000 bytes"


def case_vocab_count(tmp: Path) -> Case:
    meta = spm_meta() | {"tokenizer.ggml.tokens": ["a"] * 1_100_000}
    return (lambda: Tokenizer.from_gguf_metadata(meta), ConfigError,
            "has 1100000 tokens, more than the 1048576")


def case_json_huge_id(tmp: Path) -> Case:
    spec = bpe_json()
    spec["model"]["vocab"]["hello"] = 10**8
    path = write_json(tmp / "tokenizer.json", spec)
    return from_json(path), ConfigError, r"the id 100000000, not an integer in \[0, 1048576\)"


def case_json_far_id(tmp: Path) -> Case:
    spec = bpe_json()
    spec["added_tokens"][0]["id"] = 900_000
    path = write_json(tmp / "tokenizer.json", spec)
    return from_json(path), ConfigError, "token id 900000 is far beyond the 261 tokens"


def case_json_added_tokens(tmp: Path) -> Case:
    spec = bpe_json()
    spec["added_tokens"] += [
        {"id": 300 + i, "content": f"<{i}{'y' * 1000}>", "special": True, "single_word": False,
         "lstrip": False, "rstrip": False, "normalized": False}
        for i in range(1500)
    ]
    path = write_json(tmp / "tokenizer.json", spec)
    return from_json(path), ConfigError, r"added_tokens hold \d+ bytes, more than the 1048576"


def case_json_nested(tmp: Path) -> Case:
    path = write_json(tmp / "tokenizer.json", "[" * 200_000 + "]" * 200_000)
    return from_json(path), WeightLoadError, "is not a readable tokenizer.json"


def case_json_no_model(tmp: Path) -> Case:
    spec = bpe_json()
    del spec["model"]
    return from_json(write_json(tmp / "tokenizer.json", spec)), WeightLoadError, 'no "model"'


def case_json_vocab_type(tmp: Path) -> Case:
    spec = bpe_json()
    spec["model"]["vocab"] = "hello"
    path = write_json(tmp / "tokenizer.json", spec)
    return from_json(path), ConfigError, "model.vocab is a str, not an object or a list"


def case_garbage_model(tmp: Path) -> Case:
    (tmp / "bad.model").write_bytes(random.Random(0).randbytes(5000))
    return (lambda: Tokenizer.from_sentencepiece(tmp / "bad.model"), WeightLoadError,
            "not a SentencePiece model")


WORST_CASES: dict[str, Callable[[Path], Case]] = {
    f.__name__.removeprefix("case_"): f
    for f in (case_ever_longer_tokens, case_ever_longer_short_tokens, case_control_tokens,
              case_vocab_count, case_json_huge_id, case_json_far_id, case_json_added_tokens,
              case_json_nested, case_json_no_model, case_json_vocab_type, case_garbage_model)
}


@pytest.mark.parametrize("name", list(WORST_CASES))
def test_named_case_is_refused_with_a_typed_error(name: str, tmp_path: Path) -> None:
    check_named_case(WORST_CASES[name], tmp_path)


def test_named_cases_stay_small_in_a_fresh_process(tmp_path: Path) -> None:
    """ru_maxrss is a high-water mark, so measure the worst cases where nothing came before:
    a fresh interpreter, with its address space capped at 4 GiB in case a bound is missing."""
    check_worst_cases_in_a_fresh_process(
        __file__, tmp_path,
        "gguf, sentencepiece, tokenizers, llama_tokenizer.gguf_vocab, llama_models.gguf_file")


# -- fuzzing -------------------------------------------------------------------------------------
EDGES = [0, 1, 2, -1, 255, 256, 2**31, 2**32 - 1, 0xFFFFFFFF, 10**6, 2**20, 10**8, 2**63, -(2**63)]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(EDGES), st.integers(), st.floats(),
              st.text(max_size=8), st.text(alphabet="ab", min_size=1000, max_size=1100)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON tree a value can be replaced or removed."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):  # a few entries of long lists are enough
            out += paths(v, (*prefix, i))
    return out


def mutate(spec: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = spec
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return spec


@settings(FUZZ, max_examples=120)
@given(data=st.data(), source=st.sampled_from([bpe_json, wordpiece_json, unigram_json]))
def test_fuzzed_tokenizer_json(data: st.DataObject, source: Callable[[], Any],
                               tmp_path: Path) -> None:
    spec = source()
    for _ in range(data.draw(st.integers(1, 3))):
        places = paths(spec)
        if not places:
            break
        spec = mutate(spec, data.draw(st.sampled_from(places)), data.draw(json_values),
                      data.draw(st.booleans()))
    open_checked(from_json(write_json(tmp_path / "tokenizer.json", spec)))


GGUF_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "general.architecture",
]
token_lists = st.one_of(
    st.lists(st.text(max_size=6), min_size=1, max_size=40),
    st.lists(st.text(alphabet="ab\u2581 ", min_size=1, max_size=1100), min_size=1, max_size=20),
    st.lists(st.sampled_from(["<s>", "a", "b", "ab", "\u2581", "<0x41>", "a b"]), max_size=30),
)
gguf_values = st.one_of(json_values, token_lists,
                        st.lists(st.sampled_from(EDGES), max_size=300),
                        st.lists(st.floats(), max_size=300))


@settings(FUZZ, max_examples=120)
@given(source=st.sampled_from([spm_meta, byte_level_meta]),
       edits=st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_values, min_size=1, max_size=3),
       gemma=st.booleans())
def test_fuzzed_gguf_vocabulary(source: Callable[[], dict[str, Any]], edits: dict[str, Any],
                                gemma: bool) -> None:
    meta = source() | edits
    if gemma:
        meta["general.architecture"] = "gemma3"
    open_checked(lambda: Tokenizer.from_gguf_metadata(meta))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzzed_sentencepiece_model(data: st.DataObject, spm_model: bytes,
                                    tmp_path: Path) -> None:
    buf = bytearray(spm_model)
    if data.draw(st.integers(0, 9)) == 0:
        buf = bytearray(data.draw(st.binary(max_size=400)))
    for _ in range(data.draw(st.integers(0, 8)) if buf else 0):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    (tmp_path / "fuzz.model").write_bytes(bytes(buf))
    open_checked(lambda: Tokenizer.from_sentencepiece(tmp_path / "fuzz.model"))


@settings(FUZZ, max_examples=80)
@given(
    kind=st.sampled_from(["llama", "gpt2"]),
    arch=st.sampled_from(["llama", "gemma3"]),
    vocab=st.lists(
        st.tuples(
            st.one_of(st.text(max_size=4), st.text(alphabet="ab\u2581 ", max_size=1100),
                      st.sampled_from(["<s>", "</s>", "a", "ab", "\u2581", "<0x41>", "h e"])),
            st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 0, 7, -1, 2**31]),
            st.floats(),
        ),
        min_size=1, max_size=300,
    ),
    merges=st.lists(st.text(alphabet="ab \u2581", max_size=8), max_size=50),
)
def test_random_gguf_vocabularies(kind: str, arch: str, vocab: list[tuple[str, int, float]],
                                  merges: list[str]) -> None:
    """Consistent but arbitrary vocabularies: any tokens (long runs included), any token types,
    any scores (NaN included), any merges."""
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.model": kind,
        "tokenizer.ggml.tokens": [t for t, _, _ in vocab],
        "tokenizer.ggml.token_type": [ty for _, ty, _ in vocab],
        "tokenizer.ggml.scores": [s for _, _, s in vocab],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
    }
    open_checked(lambda: Tokenizer.from_gguf_metadata(meta))
