"""SentencePiece `.model` files: a tiny model trained here, against `sentencepiece` itself."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm

from llama_tokenizer import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer",
    "sentencepiece splits words into pieces",
    "café naïve façade déjà vu",
    "numbers like 12 and 345 appear too",
] * 40
TEXTS = [
    "hello world",
    "the lazy fox says hello",
    "pieces of words",
    "café déjà vu",
    "unseen: 日本 😀 ß",  # not in the corpus: byte fallback
    "12345",
    "",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def sp(model_path: Path) -> Any:
    return spm.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.from_sentencepiece(model_path)


def test_ids_match_sentencepiece(tok: Tokenizer, sp: Any) -> None:
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.add_bos and not tok.add_eos
    for text in TEXTS:
        assert tok.encode(text, add_special=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text


def test_control_tokens_in_text(tok: Tokenizer, sp: Any) -> None:
    ids = tok.encode("hello</s>world", add_special=False)
    assert ids == [*sp.encode("hello"), sp.eos_id(), *sp.encode("world")]
    plain = tok.encode("hello</s>world", add_special=False, parse_special=False)
    assert plain == sp.encode("hello</s>world") and sp.eos_id() not in plain


def test_decode_round_trips_and_matches_sentencepiece(tok: Tokenizer, sp: Any) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == text == sp.decode(ids)
        dec = tok.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text
    # Both drop the dummy-prefix space of the first piece. (When that piece is all spaces,
    # sentencepiece goes on stripping the spaces of the pieces after it; encode never starts
    # that way, and we strip one space, as llama.cpp and HF's Metaspace decoder do.)
    normal = [
        i
        for i in range(sp.get_piece_size())
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
    ]
    first = [i for i in normal if sp.id_to_piece(i).strip("\u2581")]
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice(first)] + [rng.choice(normal) for _ in range(rng.randint(0, 12))]
        assert tok.decode(ids) == sp.decode(ids), ids
        dec = tok.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


def test_continuation_keeps_the_leading_space(tok: Tokenizer) -> None:
    ids = tok.encode(" world", add_special=False)
    assert tok.decode(ids) == "world"
    assert tok.decode(ids, continuation=True) == " world"
    dec = tok.stream_decoder(continuation=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == " world"


def test_hf_dir_with_tokenizer_model(model_path: Path, tmp_path: Path, sp: Any) -> None:
    (tmp_path / "tokenizer.model").write_bytes(model_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"content": "</s>", "special": True},
                "add_bos_token": False,
                "add_eos_token": True,
                "chat_template": "{% for m in messages %}{{ bos_token }}{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}",
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos is False and tok.add_eos is True
    assert tok.encode("hello") == [*sp.encode("hello"), sp.eos_id()]
    assert tok.eog_ids == frozenset({0, 2})
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_surrogates_are_refused(tok: Tokenizer) -> None:
    from llama_engine.errors import InvalidParamsError

    with pytest.raises(InvalidParamsError, match="surrogate"):
        tok.encode("ok \udcff")
