"""Streaming detokenization that never emits half a UTF-8 character.

A token is a run of bytes, not of characters: byte-level BPE and SentencePiece byte fallback both
cut multi-byte characters (emoji, CJK) across tokens. `StreamDecoder` feeds each token's bytes to
an incremental UTF-8 decoder, which holds an incomplete character back until its last byte
arrives. Invariant: for any ids, `"".join(d.push(i) for i in ids) + d.flush()` equals
`tokenizer.decode(ids, skip_special=..., continuation=...)` with the same options.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_tokenizer.base import Tokenizer

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Turns token ids into text one id at a time; see the module docstring for the invariant.

    Invalid UTF-8 (a model that emits a lone continuation byte) comes out as U+FFFD, exactly as
    `Tokenizer.decode` renders it. Not thread-safe: use one decoder per stream.
    """

    __slots__ = ("_decoder", "_pieces", "_skip_special", "_special", "_strip", "_tokenizer")

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special: bool = True, continuation: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._pieces = tokenizer._pieces
        self._special = tokenizer._special
        self._skip_special = skip_special
        self._strip = tokenizer._strip_leading_space and not continuation
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still incomplete."""
        i = self._tokenizer._check_id(token_id)
        if self._skip_special and self._special[i]:
            return ""
        data = self._pieces[i]
        if self._strip and data:
            # The first piece that contributes bytes loses the space its tokenizer prepended.
            self._strip = False
            if data[:1] == b" ":
                data = data[1:]
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End the stream: bytes still held (an unfinished character) come out as U+FFFD.

        The decoder can then be reused; what it decodes next is treated as a continuation.
        """
        self._strip = False
        return self._decoder.decode(b"", final=True)
