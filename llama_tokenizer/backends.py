"""The two encoders behind `Tokenizer`: HF `tokenizers` and `sentencepiece`."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

import sentencepiece
import tokenizers

from llama_tokenizer.base import Tokenizer

__all__ = ["SentencePieceTokenizer", "TokenizersTokenizer"]


class TokenizersTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (built from a GGUF vocabulary or read from `tokenizer.json`).

    With `use_post_processor`, `encode(add_special=True)` lets the backend's post-processor add
    the special tokens (BERT's [CLS] ... [SEP]); otherwise BOS/EOS are added from `add_bos` and
    `add_eos`. Truncation and padding are always off.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, *, use_post_processor: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        self._backend = backend
        self._use_post_processor = use_post_processor
        # `encode_special_tokens` is state on the backend, flipped for parse_special=False.
        self._lock = threading.Lock()

    def _encode(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        if not self._use_post_processor:
            return super()._encode(text, add_special=add_special, parse_special=parse_special)
        return self._run(text, parse_special=parse_special, add_special_tokens=add_special)

    def _encode_text(self, text: str, *, parse_special: bool) -> list[int]:
        return self._run(text, parse_special=parse_special, add_special_tokens=False)

    def _run(self, text: str, *, parse_special: bool, add_special_tokens: bool) -> list[int]:
        with self._lock:
            if parse_special:
                return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
            self._backend.encode_special_tokens = True
            try:
                return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                self._backend.encode_special_tokens = False

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A `sentencepiece.SentencePieceProcessor`.

    SentencePiece never reads control tokens in text, so with parse_special=True the text is cut
    at their spellings first and each piece between them is encoded on its own (the way llama.cpp
    does it, dummy prefix included).
    """

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        *,
        special_text: Mapping[str, int],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._sp = processor
        self._special_ids = dict(special_text)
        names = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    def _encode_text(self, text: str, *, parse_special: bool) -> list[int]:
        sp = self._sp
        if not parse_special or self._special_re is None:
            return list(sp.encode(text))
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += sp.encode(text[pos : m.start()])
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += sp.encode(text[pos:])
        return ids

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None
