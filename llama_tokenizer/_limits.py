"""Bounds on tokenizer files, checked before anything is built from them.

Generous for real tokenizers (Gemma 3: 262144 tokens, 2.3 MB of token text, the longest token 48
bytes, 6.4k control and user-defined tokens in 76 KB, a 33 MB tokenizer.json), small enough that
no file, however it is written, can make opening it take minutes or gigabytes: a vocabulary of
ever-longer tokens, one token id of 10**8 or a million special tokens is refused up front.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from llama_engine.errors import ConfigError, file_read_errors

__all__ = [
    "MAX_ADDED_TOKEN_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_MERGES",
    "MAX_SPM_BYTES",
    "MAX_TOKENIZER_JSON_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_VOCAB",
    "MAX_VOCAB_BYTES",
    "check_file_size",
    "check_vocab",
    "max_id_for",
    "typed_errors",
]

MAX_VOCAB = 1 << 20
"""tokens in one vocabulary"""
MAX_TOKEN_BYTES = 1024
"""UTF-8 bytes of one token as the file spells it"""
MAX_VOCAB_BYTES = 32 << 20
"""UTF-8 bytes of all tokens together"""
MAX_ADDED_TOKEN_BYTES = 1 << 20
"""bytes of the control, user-defined and added tokens, which `tokenizers` matches in raw text
with an automaton costing ~80 bytes and ~1.5 us per byte"""
MAX_MERGES = 1 << 22
"""BPE merges stored in a file"""
MAX_TOKENIZER_JSON_BYTES = 128 << 20
MAX_CONFIG_BYTES = 64 << 20
"""tokenizer_config.json and the other small JSON files beside a tokenizer"""
MAX_SPM_BYTES = 32 << 20
"""a SentencePiece .model file"""


def max_id_for(n_entries: int) -> int:
    """The largest token id a vocabulary of `n_entries` distinct ids may use: ids may leave
    holes (added tokens placed after a padded vocabulary), but not more holes than tokens."""
    return min(MAX_VOCAB, 2 * n_entries + 1024) - 1


def check_vocab(tokens: Sequence[Any], source: str, *, what: str = "the vocabulary") -> None:
    """`tokens` (strings) within MAX_VOCAB entries, MAX_TOKEN_BYTES each, MAX_VOCAB_BYTES in all.
    Non-strings are left to the caller, which knows how to name them."""
    if len(tokens) > MAX_VOCAB:
        raise ConfigError(
            f"{source}: {what} has {len(tokens)} tokens, more than the {MAX_VOCAB} llama-engine "
            "accepts; the file is corrupt or not a tokenizer, restore it"
        )
    total = 0
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            continue
        n = len(t.encode("utf-8", "replace"))
        if n > MAX_TOKEN_BYTES:
            raise ConfigError(
                f"{source}: token {i} of {what} is {n} bytes long, more than the "
                f"{MAX_TOKEN_BYTES} llama-engine accepts; the file is corrupt, restore it"
            )
        total += n
    if total > MAX_VOCAB_BYTES:
        raise ConfigError(
            f"{source}: {what} holds {total} bytes of token text, more than the "
            f"{MAX_VOCAB_BYTES} llama-engine accepts; the file is corrupt, restore it"
        )


def check_file_size(path: Any, limit: int, what: str) -> int:
    """The size of the file at `path`, refused when over `limit` bytes."""
    size = int(path.stat().st_size)
    if size > limit:
        raise ConfigError(
            f"{path} is {size} bytes, more than the {limit} a {what} may have; "
            "pass the right file"
        )
    return size


def typed_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Every failure inside becomes a `LlamaError` about the tokenizer data `what`."""
    return file_read_errors(
        what, fix="the tokenizer data is corrupt or of a kind llama-engine cannot read, restore "
        "it or load the tokenizer from another file")
