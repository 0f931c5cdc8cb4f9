"""Small hand-made GGUF vocabularies, chat-template rendering, and every error path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llama_engine.errors import (
    ConfigError,
    InvalidParamsError,
    InvalidTokenError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedOperationError,
    WeightLoadError,
)
from llama_tokenizer import ChatTemplate, Tokenizer
from llama_tokenizer._pieces import bytes_to_unicode

SPACE = "\u2581"


def byte_level_meta(**overrides: Any) -> dict[str, Any]:
    """A gpt2-style vocabulary: 3 control tokens, the 256 byte characters, a few merges."""
    alphabet = list(bytes_to_unicode().values())
    merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "Ġwor", "Ġworl", "Ġworld"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *merged]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": [
            "h e",
            "l l",
            "he ll",
            "hell o",
            "Ġ w",
            "Ġw o",
            "Ġwo r",
            "Ġwor l",
            "Ġworl d",
        ],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    meta.update(overrides)
    return meta


def spm_meta(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, a few pieces with scores."""
    pieces = [SPACE, "a", "b", "c", "bc", "ab", f"{SPACE}a", f"{SPACE}ab", "  "]
    # "bc" comes before "ab" in the file but scores lower: Gemma follows the order, others
    # the scores.
    scores = [-1.0, -2.0, -3.0, -4.0, -9.0, -5.0, -6.0, -7.0, -1000.0]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 8 + [4],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    meta.update(overrides)
    return meta


def ids_of(meta: dict[str, Any], *pieces: str) -> list[int]:
    return [meta["tokenizer.ggml.tokens"].index(p) for p in pieces]


# -- hand-made vocabularies -------------------------------------------------------------------
def test_byte_level_vocabulary() -> None:
    meta = byte_level_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("hello world") == ids_of(meta, "hello", "Ġworld")
    assert tok.encode("<|im_start|>hi") == [1, *ids_of(meta, "h", "i")]
    assert tok.decode(tok.encode("héllo wörld ✓")) == "héllo wörld ✓"
    assert tok.eog_ids == frozenset({0, 2})  # eos and <|endoftext|>
    assert tok.add_bos is False
    assert Tokenizer.from_gguf_metadata(
        byte_level_meta(**{"tokenizer.ggml.add_bos_token": True})
    ).encode("he") == [1, *ids_of(meta, "he")]


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf_metadata(byte_level_meta(**{"tokenizer.ggml.pre": "nope"}))
    assert "nope" in caplog.text
    assert tok.decode(tok.encode("hello world")) == "hello world"


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_known_pre_tokenizers_round_trip(pre: str) -> None:
    tok = Tokenizer.from_gguf_metadata(byte_level_meta(**{"tokenizer.ggml.pre": pre}))
    text = "Hello world!! It's 12345 -- ok\n\n  x"
    assert tok.decode(tok.encode(text, add_special=False)) == text


def test_spm_vocabulary_with_space_prefix() -> None:
    meta = spm_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.add_bos is True  # llama vocabularies add BOS unless told otherwise
    # llama ranks merges by score: "ab" (-5) before "bc" (-9)
    assert tok.encode("abc", add_special=False) == ids_of(meta, f"{SPACE}ab", "c")
    ids = tok.encode("ab a")
    assert ids == [1, *ids_of(meta, f"{SPACE}ab", f"{SPACE}a")]
    assert tok.decode(ids, skip_special=True) == "ab a"  # the prepended space is stripped
    assert tok.decode(ids[1:], continuation=True) == " ab a"
    assert tok.decode(tok.encode("zé", add_special=False)) == "zé"  # byte fallback
    assert tok.token_bytes(ids_of(meta, "<0xC3>")[0]) == b"\xc3"


def test_gemma_vocabulary_rules() -> None:
    meta = spm_meta("gemma3")
    tok = Tokenizer.from_gguf_metadata(meta)
    # no space prefix by default; merges follow the file order: "bc" before "ab"
    assert tok.encode("abc", add_special=False) == ids_of(meta, "a", "bc")
    # the run of two spaces is stored as "  " and matched as "▁▁"
    assert tok.encode("a  b", add_special=False) == ids_of(meta, "a", "  ", "b")
    assert tok.decode(tok.encode("a  b")) == "<s>a  b"


# -- chat templates ---------------------------------------------------------------------------
def test_chat_template_features() -> None:
    source = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
        "{% endfor %}|{{ ns.n }}|{{ tools | tojson }}|{{ extra }}|{{ bos_token }}"
        "|{{ strftime_now('%Y') | length }}|{{ dict(a=1) | tojson }}"
    )
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "2"}, {"role": "x"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = ChatTemplate(source).render(messages, tools=tools, extra=3, bos_token="<s>")
    expected_tools = '[{"type": "function", "function": {"name": "f"}}]'
    assert out == f'"é""2"|2|{expected_tools}|3|<s>|4|{{"a": 1}}'


def test_template_sees_model_tokens_and_kwargs() -> None:
    tok = Tokenizer.from_gguf_metadata(byte_level_meta())
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        chat_template="{{ bos_token }}{{ eos_token }}{{ messages[0].content }}{{ who }}",
        who="!",
    )
    assert out == "<|im_start|><|im_end|>hi!"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# -- errors -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(byte_level_meta())


@pytest.mark.parametrize("bad", [10**6, -1])
def test_decode_out_of_range_id(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(InvalidTokenError, match=rf"token id {bad} .* 0 to {tok.vocab_size - 1}"):
        tok.decode([5, bad])
    with pytest.raises(InvalidTokenError, match=str(bad)):
        tok.token_bytes(bad)
    with pytest.raises(InvalidTokenError, match=str(bad)):
        tok.is_special(bad)
    with pytest.raises(InvalidTokenError, match=str(bad)):
        tok.stream_decoder().push(bad)


def test_decode_rejects_non_ids(tok: Tokenizer) -> None:
    with pytest.raises(InvalidTokenError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidParamsError, match="encode"):
        tok.decode("hello")  # type: ignore[arg-type]
    assert isinstance(InvalidTokenError("x"), ValueError)


def test_encode_rejects_bad_text(tok: Tokenizer) -> None:
    with pytest.raises(InvalidParamsError, match="must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidParamsError, match="surrogate"):
        tok.encode("a\ud800b")


def test_unknown_tokenizer_model() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'rwkv' is not supported"):
        Tokenizer.from_gguf_metadata(byte_level_meta(**{"tokenizer.ggml.model": "rwkv"}))


@pytest.mark.parametrize(
    ("overrides", "error", "phrase"),
    [
        ({"tokenizer.ggml.model": None}, ConfigError, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": []}, ConfigError, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": [1, 1]}, ConfigError, "has 2 entries"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, ConfigError, "outside the vocabulary"),
        ({"tokenizer.ggml.merges": ["nospace"]}, ConfigError, "not 'left right'"),
        ({"tokenizer.ggml.merges": None}, ConfigError, "no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["x y"]}, WeightLoadError, "do not fit"),
    ],
)
def test_broken_gguf_metadata(overrides: dict[str, Any], error: type, phrase: str) -> None:
    meta = {k: v for k, v in byte_level_meta(**overrides).items() if v is not None}
    with pytest.raises(error, match=phrase):
        Tokenizer.from_gguf_metadata(meta)


def test_template_raise_exception(tok: Tokenizer) -> None:
    source = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Only user roles!') }}{% endif %}"
    )
    with pytest.raises(InvalidParamsError, match="Only user roles!"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], chat_template=source)


def test_template_errors(tok: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        tok.apply_chat_template([{"role": "user"}], chat_template="{% for %}")
    with pytest.raises(InvalidParamsError, match="rendering the chat template failed"):
        tok.apply_chat_template([{"role": "user"}], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(InvalidParamsError, match="messages must be a list"):
        tok.apply_chat_template("hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidParamsError, match="'role'"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(InvalidParamsError, match="tools must be"):
        tok.apply_chat_template([{"role": "user"}], tools=[print])  # type: ignore[list-item]
    no_template = Tokenizer.from_gguf_metadata(byte_level_meta(**{"tokenizer.chat_template": 1}))
    with pytest.raises(UnsupportedOperationError, match=r"no chat template.*chat_template="):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Tokenizer.from_tokenizer_json(tmp_path / "missing.json")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Tokenizer.from_sentencepiece(tmp_path / "missing.model")
    with pytest.raises(ModelNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightLoadError, match="tokenizer.json"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(WeightLoadError, match="tokenizers"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightLoadError, match="not a SentencePiece model"):
        Tokenizer.from_sentencepiece(tmp_path / "bad.model")


def test_parse_special_is_thread_safe(tok: Tokenizer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    text = "<|im_start|>hello world<|im_end|>" * 50
    parsed, plain = tok.encode(text), tok.encode(text, parse_special=False)
    assert parsed != plain

    def work(n: int) -> bool:
        if n % 2:
            return tok.encode(text, parse_special=False) == plain
        return tok.encode(text) == parsed

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(400)))
