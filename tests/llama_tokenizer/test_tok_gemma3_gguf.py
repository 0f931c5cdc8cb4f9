"""Gemma 3's GGUF vocabulary (SentencePiece-style, 262144 pieces, no merges) vs transformers."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_engine.errors import UnsupportedOperationError
from llama_tokenizer import Tokenizer

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
VOCAB = 262144
BYTE_IDS = range(238, 494)  # <0x00> .. <0xFF>


@pytest.fixture(scope="module")
def gemma3_meta(gemma3_gguf: str) -> dict[str, Any]:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(gemma3_gguf).fields.items()}


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_meta: dict[str, Any]) -> Tokenizer:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(gemma3_meta)
    print(f"\nGemma 3 tokenizer built in {time.perf_counter() - start:.2f} s")
    return tok


@pytest.fixture(scope="module")
def hf_tok(gemma3_gguf: str, hf_gguf_loader: Any) -> Any:
    return hf_gguf_loader(gemma3_gguf)


def _random_texts(n: int, seed: int) -> list[str]:
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789     \n\n\t")
        + list(".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
        + list("éèàüöñçßøå你好世界日本語한국어😀🎉👍🏽‍♂️①²½١٢٣∑√π—–…«»“”\u3000\xa0▁")
        + ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<0x41>"]
        + ["[multimodal]"]
        + ["  ", "    ", "        ", "\n\n", "\t\t", "'s", "https://", "def ", "return ", " the"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_metadata(gemma3_tok: Tokenizer) -> None:
    tok = gemma3_tok
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.add_bos is True and tok.add_eos is False
    assert tok.eog_ids == frozenset({1, 106})  # <eos>, <end_of_turn>
    assert tok.chat_template is None
    assert tok.is_special(106) and tok.is_special(2) and not tok.is_special(107)  # 107 is "\n"
    assert tok.token_bytes(238 + 0x41) == b"A"
    assert tok.token_bytes(138) == b"  "  # stored with real spaces
    assert tok.token_to_id("\u2581\u2581") == 138  # looked up as a "▁" run


def test_encode_time(gemma3_tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 200
    start = time.perf_counter()
    ids = gemma3_tok.encode(text)
    elapsed = time.perf_counter() - start
    print(f"\nGemma 3 encode {len(text)} chars -> {len(ids)} ids in {elapsed:.4f} s")
    assert elapsed < 1


@pytest.mark.parametrize("add_special", [True, False])
def test_ids_match_transformers(
    gemma3_tok: Tokenizer, hf_tok: Any, texts: list[str], add_special: bool
) -> None:
    for text in texts + _random_texts(300, seed=1):
        ours = gemma3_tok.encode(text, add_special=add_special)
        assert ours == hf_tok.encode(text, add_special_tokens=add_special), repr(text)


def test_parse_special_false_matches_transformers(
    gemma3_tok: Tokenizer, hf_tok: Any, texts: list[str]
) -> None:
    for text in texts + _random_texts(200, seed=2):
        ours = gemma3_tok.encode(text, add_special=False, parse_special=False)
        theirs = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours == theirs, repr(text)
    assert 106 not in gemma3_tok.encode("<end_of_turn>", parse_special=False)
    assert gemma3_tok.encode("<end_of_turn>", add_special=False) == [106]


def test_whitespace_runs_use_their_tokens(gemma3_tok: Tokenizer) -> None:
    assert 138 in gemma3_tok.encode("a  b")  # two spaces
    assert gemma3_tok.encode("\n\n", add_special=False) == [108]  # user-defined, matched whole


def test_decode_round_trips_and_matches_transformers(
    gemma3_tok: Tokenizer, hf_tok: Any, texts: list[str]
) -> None:
    for text in texts + _random_texts(200, seed=3):
        ids = gemma3_tok.encode(text, add_special=False)
        expected = text.replace("\u2581", " ")  # a literal "▁" reads back as a space
        assert gemma3_tok.decode(ids) == expected, repr(text)
        assert gemma3_tok.decode(ids) == hf_tok.decode(ids)
        with_bos = gemma3_tok.encode(text)
        assert gemma3_tok.decode(with_bos, skip_special=True) == hf_tok.decode(
            with_bos, skip_special_tokens=True
        )
        assert gemma3_tok.decode(with_bos) == hf_tok.decode(with_bos)


def test_no_chat_template(gemma3_tok: Tokenizer) -> None:
    with pytest.raises(UnsupportedOperationError, match="no chat template"):
        gemma3_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    prompt = gemma3_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=template
    )
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma3_tok.encode(prompt, add_special=False)[:2] == [2, 105]


_IDS = st.lists(
    st.one_of(st.sampled_from(BYTE_IDS), st.integers(min_value=0, max_value=VOCAB - 1)),
    max_size=40,
)


@FUZZ
@given(ids=_IDS)
def test_stream_equals_decode_for_any_ids(gemma3_tok: Tokenizer, ids: list[int]) -> None:
    for skip in (True, False):
        dec = gemma3_tok.stream_decoder(skip_special=skip)
        text = "".join(dec.push(i) for i in ids) + dec.flush()
        assert text == gemma3_tok.decode(ids, skip_special=skip)


@FUZZ
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_stream_never_emits_replacement_for_valid_text(gemma3_tok: Tokenizer, text: str) -> None:
    ids = gemma3_tok.encode(text, parse_special=False)
    dec = gemma3_tok.stream_decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == gemma3_tok.decode(ids, skip_special=True)
    assert "".join(parts) == text.replace("\u2581", " ")
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in parts)


def test_stream_holds_byte_fallback_characters(gemma3_tok: Tokenizer) -> None:
    ids = [238 + b for b in "😀".encode()]  # the emoji as four byte tokens
    dec = gemma3_tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "", "😀"]
    assert dec.flush() == ""
