"""SmolLM2's GGUF vocabulary (byte-level BPE, pre-tokenizer "smollm") against transformers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_tokenizer import StreamDecoder, Tokenizer

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# SmolLM2's pre-tokenizer ("smollm" in llama.cpp, Digits + ByteLevel in its tokenizer.json)
# splits every digit off before the GPT-2 regex. transformers' GGUF loader does not know the
# name "smollm" and keeps plain GPT-2 splitting. The two agree whenever no merge can join a
# digit to its neighbours, which holds for ASCII digits (SmolLM2 never learned such merges), but
# not for a space before a non-ASCII digit (" ٥" -> "ĠÙ" + ...) nor for a newline run right
# before a digit ("\n\n6": GPT-2's \s+(?!\S) splits the run, a digit-split text does not).
DIVERGENT_TEXTS = ["١٢٣٤ ٥٦", "total:\n\n6 items", "z\n ١"]


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf: str, hf_gguf_loader: Any) -> Any:
    return hf_gguf_loader(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_reference(hf_tok: Any) -> Any:
    """transformers' tokenizer with SmolLM2's real pre-tokenizer (Digits, then ByteLevel)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    backend = HFTokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def test_metadata(smollm2_tok: Tokenizer) -> None:
    tok = smollm2_tok
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos is False and tok.add_eos is False
    # eos (<|im_end|>) plus <|endoftext|>, a turn end in this vocabulary
    assert tok.eog_ids == frozenset({0, 2})
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.is_special(1) and not tok.is_special(19556)
    assert tok.token_to_id("<|im_start|>") == 1


def test_build_and_encode_time(smollm2_meta: dict[str, Any]) -> None:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(smollm2_meta)
    build = time.perf_counter() - start
    text = "The quick brown fox jumps over the lazy dog. " * 200
    start = time.perf_counter()
    ids = tok.encode(text)
    encode = time.perf_counter() - start
    print(f"SmolLM2 build {build:.2f} s, encode {len(text)} chars -> {len(ids)} ids {encode:.4f} s")
    assert build < 10 and encode < 1


@pytest.mark.parametrize("add_special", [True, False])
def test_ids_match_transformers(
    smollm2_tok: Tokenizer, hf_tok: Any, texts: list[str], add_special: bool
) -> None:
    for text in texts:
        ours = smollm2_tok.encode(text, add_special=add_special)
        assert ours == hf_tok.encode(text, add_special_tokens=add_special), text


def test_special_markers_are_single_tokens(smollm2_tok: Tokenizer) -> None:
    ids = smollm2_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    plain = smollm2_tok.encode("<|im_start|>user\nhi<|im_end|>", parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert smollm2_tok.decode(plain) == "<|im_start|>user\nhi<|im_end|>"


def test_parse_special_false_matches_transformers(
    smollm2_tok: Tokenizer, hf_tok: Any, texts: list[str]
) -> None:
    for text in texts:
        ours = smollm2_tok.encode(text, add_special=False, parse_special=False)
        theirs = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours == theirs, text


def test_digit_splitting_follows_llama_cpp_not_transformers(
    smollm2_tok: Tokenizer, hf_tok: Any, hf_reference: Any
) -> None:
    # Known ids for SmolLM2: each digit alone, and the space before them alone (216).
    assert smollm2_tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    for text in DIVERGENT_TEXTS:
        ours = smollm2_tok.encode(text)
        assert ours == hf_reference.encode(text, add_special_tokens=False).ids, text
        assert ours != hf_tok.encode(text, add_special_tokens=False), text  # the divergence
        assert smollm2_tok.decode(ours) == text


def test_decode_round_trips_and_matches_transformers(
    smollm2_tok: Tokenizer, hf_tok: Any, texts: list[str]
) -> None:
    for text in texts:
        ids = smollm2_tok.encode(text)
        assert smollm2_tok.decode(ids) == text
        assert smollm2_tok.decode(ids) == hf_tok.decode(ids)
        assert smollm2_tok.decode(ids, skip_special=True) == hf_tok.decode(
            ids, skip_special_tokens=True
        )


def test_token_bytes(smollm2_tok: Tokenizer) -> None:
    tok = smollm2_tok
    assert tok.token_bytes(216) == b" "  # "Ġ"
    assert tok.token_bytes(1) == b"<|im_start|>"
    emoji = tok.encode("😀")
    assert b"".join(tok.token_bytes(i) for i in emoji) == "😀".encode()
    assert len(emoji) > 1  # the emoji is cut inside its UTF-8 bytes


def test_chat_template_matches_transformers(smollm2_tok: Tokenizer, hf_tok: Any) -> None:
    conversations = [
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan? 日本"},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = smollm2_tok.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
    prompt = smollm2_tok.apply_chat_template(conversations[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    # system (the default one), user, assistant, user, and the generation prompt
    assert smollm2_tok.encode(prompt).count(1) == 5


def _stream(dec: StreamDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@FUZZ
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=40))
def test_stream_equals_decode_for_any_ids(smollm2_tok: Tokenizer, ids: list[int]) -> None:
    for skip in (True, False):
        parts = _stream(smollm2_tok.stream_decoder(skip_special=skip), ids)
        assert "".join(parts) == smollm2_tok.decode(ids, skip_special=skip)


# SmolLM2's vocabulary has no token for the bytes 0x04 0x06 0x13 0x14 0x16 0x1D and the lead
# bytes 0xF1 0xF2 (planes 4-11, unassigned). BPE drops such bytes, in llama.cpp and transformers
# alike, so texts here avoid them.
_REPRESENTABLE = st.characters(
    max_codepoint=0x3FFFF,
    exclude_categories=("Cs",),
    exclude_characters="\x04\x06\x13\x14\x16\x1d",
)


@FUZZ
@given(text=st.text(alphabet=_REPRESENTABLE, max_size=60))
def test_stream_never_emits_replacement_for_valid_text(smollm2_tok: Tokenizer, text: str) -> None:
    ids = smollm2_tok.encode(text, add_special=False, parse_special=False)
    parts = _stream(smollm2_tok.stream_decoder(skip_special=False), ids)
    assert "".join(parts) == text == smollm2_tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in parts)


def test_stream_holds_split_characters(smollm2_tok: Tokenizer) -> None:
    text = "a😀b日本👨‍👩‍👧c"
    ids = smollm2_tok.encode(text)
    dec = smollm2_tok.stream_decoder()
    parts = [dec.push(i) for i in ids]
    assert "" in parts  # some token ended mid-character and was held back
    assert "".join(parts) + dec.flush() == text
    assert all("\ufffd" not in p for p in parts)
    # an unfinished character at the end comes out as one U+FFFD on flush, as decode renders it
    cut = smollm2_tok.encode("😀")[:-1]
    dec = smollm2_tok.stream_decoder()
    assert "".join(dec.push(i) for i in cut) == ""
    assert dec.flush() == "\ufffd" == smollm2_tok.decode(cut)


def test_stream_skips_special_tokens(smollm2_tok: Tokenizer) -> None:
    ids = smollm2_tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    dec = smollm2_tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "assistant\nHi there"


def test_hf_dir_saved_by_transformers(hf_tok: Any, texts: list[str], tmp_path: Any) -> None:
    # transformers writes its own byte-level tokenizer.json (GPT-2 splitting, see above),
    # tokenizer_config.json and the chat template; from_hf_dir must read them all back.
    hf_tok.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert 2 in tok.eog_ids and 0 in tok.eog_ids
    for text in texts:
        for add in (True, False):
            assert tok.encode(text, add_special=add) == hf_tok.encode(
                text, add_special_tokens=add
            ), text
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    assert tok.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
