"""HF tokenizer.json (MiniLM's WordPiece) against `tokenizers` and transformers."""

from __future__ import annotations

import os
from typing import Any

import pytest

from llama_tokenizer import Tokenizer

TEXTS = [
    "Hello, World!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café [SEP] résumé",
    "Tokenization of unbelievably long words: antidisestablishmentarianism",
    "数字 123 and 日本語",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_json(minilm_dir: str) -> str:
    return os.path.join(minilm_dir, "tokenizer.json")


@pytest.fixture(scope="module")
def raw(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(tokenizer_json)
    backend.no_padding()  # the file pads and truncates to 128; ours never does
    backend.no_truncation()
    return backend


@pytest.fixture(scope="module")
def hf_tok(minilm_dir: str) -> Any:
    import transformers  # in the test extra

    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(tokenizer_json)


def test_ids_match_tokenizers_and_transformers(tok: Tokenizer, raw: Any, hf_tok: Any) -> None:
    for text in TEXTS:
        for add in (True, False):
            ours = tok.encode(text, add_special=add)
            assert ours == raw.encode(text, add_special_tokens=add).ids, text
            assert ours == hf_tok.encode(text, add_special_tokens=add), text
    assert tok.encode("Hello")[0] == 101 and tok.encode("Hello")[-1] == 102  # [CLS] ... [SEP]


def test_hf_dir_and_config(minilm_dir: str, tok: Tokenizer, hf_tok: Any) -> None:
    from_dir = Tokenizer.from_hf_dir(minilm_dir)
    with_config = Tokenizer.from_tokenizer_json(
        os.path.join(minilm_dir, "tokenizer.json"),
        config_path=os.path.join(minilm_dir, "tokenizer_config.json"),
    )
    for other in (from_dir, with_config):
        assert other.vocab_size == tok.vocab_size == 30522
        assert [other.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert tok.bos_id is None and tok.eos_id is None and tok.chat_template is None
    assert tok.is_special(101) and not tok.is_special(7592)


def test_no_truncation(tok: Tokenizer) -> None:
    assert len(tok.encode("word " * 300)) == 302


def test_decode(tok: Tokenizer, hf_tok: Any) -> None:
    # WordPiece joins words with spaces and glues "##" pieces; HF's punctuation cleanup
    # ("hello , world" -> "hello, world") is not applied, so compare on text without it.
    for text in ["the quick brown fox", "unbelievably tokenized words", "naive cafe"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == f"[CLS] {text} [SEP]"
        dec = tok.stream_decoder(skip_special=True)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text
