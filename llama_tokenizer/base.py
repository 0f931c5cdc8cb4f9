"""`Tokenizer`: text to token ids and back, plus the model's chat template.

One interface over three sources (a GGUF's embedded vocabulary, an HF `tokenizer.json`, a
SentencePiece `.model`). Encoding is delegated to `tokenizers` or `sentencepiece`; decoding is
done here, from one table holding the raw bytes each token contributes to the text, so that:

- `decode(ids)` is the concatenation of `token_bytes(i)`, read as UTF-8 with errors="replace";
  the one exception is the first piece of a tokenizer that prepends a space when it encodes
  (SentencePiece's dummy prefix, WordPiece's word separator), which loses that space;
- `decode(ids, skip_special=True)` drops the control tokens (`is_special`);
- a `StreamDecoder` emits exactly the same text, one token at a time.
"""

from __future__ import annotations

import logging
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llama_engine.errors import (
    ConfigError,
    InvalidParamsError,
    InvalidTokenError,
    UnsupportedOperationError,
)
from llama_tokenizer._limits import typed_errors
from llama_tokenizer.chat_template import compile_chat_template
from llama_tokenizer.detokenizer import StreamDecoder

__all__ = ["CHAT_END_TOKENS", "Tokenizer"]

logger = logging.getLogger(__name__)

# Tokens that end a turn in the chat formats we know; generation stops on any that exists.
CHAT_END_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
)


class Tokenizer(ABC):
    """A model's tokenizer: `encode`, `decode`, streaming decode and the chat template.

    Build one with `from_gguf_metadata`, `from_tokenizer_json`, `from_hf_dir` or
    `from_sentencepiece`. Instances are immutable after construction and safe to share
    between threads.

    Attributes:
        vocab_size: ids run from 0 to vocab_size - 1.
        bos_id, eos_id: the begin/end-of-sequence token ids, or None if the model has none.
        eog_ids: ids that end generation: eos, plus end-of-turn tokens (<|im_end|>, ...).
        chat_template: the model's Jinja chat template, or None.
        add_bos, add_eos: whether `encode(text, add_special=True)` adds BOS / EOS.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]
    chat_template: str | None
    add_bos: bool
    add_eos: bool

    def __init__(
        self,
        *,
        pieces: Sequence[bytes],
        special: Iterable[int],
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: Iterable[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        strip_leading_space: bool = False,
        template_tokens: Mapping[str, str] | None = None,
        source: str = "",
    ) -> None:
        n = len(pieces)
        self.vocab_size = n
        self._pieces: list[bytes] = list(pieces)
        mask = bytearray(n)
        for i in special:
            mask[i] = 1
        self._special = bytes(mask)
        for name, value in (("bos", bos_id), ("eos", eos_id)):
            if value is not None and not 0 <= value < n:
                raise ConfigError(
                    f"the {name} token id {value} is outside the vocabulary [0, {n}) of {source}; "
                    "the tokenizer data is inconsistent, re-export the model"
                )
        self.bos_id = bos_id
        self.eos_id = eos_id
        eog = {i for i in eog_ids if 0 <= i < n}
        if eos_id is not None:
            eog.add(eos_id)
        self.eog_ids = frozenset(eog)
        if add_bos and bos_id is None:
            logger.warning("%s asks for a BOS token but defines none; not adding one", source)
            add_bos = False
        if add_eos and eos_id is None:
            logger.warning("%s asks for an EOS token but defines none; not adding one", source)
            add_eos = False
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template or None
        self._strip_leading_space = bool(strip_leading_space)
        self._template_tokens = dict(template_tokens or {})
        self._source = source

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file embeds, from its metadata as plain Python values.

        `meta` is `{key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}`,
        so a model loader can share one reader with the tokenizer.
        """
        from llama_tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

        with typed_errors("the tokenizer in the GGUF metadata"):
            return tokenizer_from_gguf_metadata(meta)

    @classmethod
    def from_tokenizer_json(
        cls, path: str | os.PathLike[str], *, config_path: str | os.PathLike[str] | None = None
    ) -> Tokenizer:
        """An HF `tokenizer.json`; `config_path` is its `tokenizer_config.json` (special tokens,
        add_bos/add_eos, chat template), by default the one beside `path` if there is one."""
        from llama_tokenizer.hf import tokenizer_from_json

        with typed_errors(f"tokenizer {path!s}"):
            return tokenizer_from_json(path, config_path=config_path)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """An HF model directory: `tokenizer.json`, else `tokenizer.model` (SentencePiece), with
        `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja` and
        `generation_config.json` when present."""
        from llama_tokenizer.hf import tokenizer_from_hf_dir

        with typed_errors(f"the tokenizer of {path!s}"):
            return tokenizer_from_hf_dir(path)

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A SentencePiece `.model` file."""
        from llama_tokenizer.spm import tokenizer_from_sentencepiece

        with typed_errors(f"SentencePiece model {path!s}"):
            return tokenizer_from_sentencepiece(path)

    # -- encoding ---------------------------------------------------------------------------------
    def encode(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids for `text`.

        add_special: add BOS/EOS as the model asks (`add_bos`, `add_eos`).
        parse_special: read control-token text such as "<|im_start|>" as that token; when False
            it is encoded as the plain characters. User-defined tokens always match.
        """
        if not isinstance(text, str):
            raise InvalidParamsError(
                f"text must be a str, got {type(text).__name__}; decode bytes to str first"
            )
        try:
            return self._encode(text, add_special=add_special, parse_special=parse_special)
        except (TypeError, UnicodeError, RuntimeError):  # how the backends refuse surrogates
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as bad:
                raise InvalidParamsError(
                    f"text holds an unpaired surrogate {text[bad.start]!r} at index {bad.start}, "
                    "which is not valid Unicode; clean the input, e.g. "
                    "s.encode('utf-8', 'replace').decode()"
                ) from None
            raise

    def _encode(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        ids = self._encode_text(text, parse_special=parse_special)
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    @abstractmethod
    def _encode_text(self, text: str, *, parse_special: bool) -> list[int]:
        """Ids for `text` without BOS/EOS."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of the token spelled `token` in the vocabulary, or None."""

    # -- decoding ---------------------------------------------------------------------------------
    def _check_id(self, token_id: Any) -> int:
        try:
            i = operator.index(token_id)
        except TypeError:
            raise InvalidTokenError(
                f"token ids must be integers, got {token_id!r} ({type(token_id).__name__}); "
                "pass ids as returned by encode()"
            ) from None
        if not 0 <= i < self.vocab_size:
            raise InvalidTokenError(
                f"token id {i} is outside the vocabulary: valid ids are 0 to "
                f"{self.vocab_size - 1}; pass ids produced by this model's tokenizer"
            )
        return i

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes `token_id` contributes to the text (control tokens: their own text)."""
        return self._pieces[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS, <|im_start|>, ...)."""
        return bool(self._special[self._check_id(token_id)])

    def decode(
        self, ids: Sequence[int], *, skip_special: bool = False, continuation: bool = False
    ) -> str:
        """The text for `ids`.

        skip_special: drop control tokens.
        continuation: `ids` continue earlier text (e.g. generated tokens after a prompt), so a
            leading space the tokenizer would strip from the start of a text is kept.
        """
        if isinstance(ids, str | bytes):
            raise InvalidParamsError(
                f"ids must be a sequence of token ids, got {type(ids).__name__}; "
                "to turn text into ids call encode()"
            )
        pieces, special, check = self._pieces, self._special, self._check_id
        strip = self._strip_leading_space and not continuation
        out: list[bytes] = []
        for raw in ids:
            i = check(raw)
            if skip_special and special[i]:
                continue
            data = pieces[i]
            if strip and data:
                strip = False
                if data[:1] == b" ":
                    data = data[1:]
            out.append(data)
        return b"".join(out).decode("utf-8", errors="replace")

    def stream_decoder(
        self, *, skip_special: bool = True, continuation: bool = False
    ) -> StreamDecoder:
        """A decoder that turns ids into text one at a time, never splitting a character."""
        return StreamDecoder(self, skip_special=skip_special, continuation=continuation)

    # -- chat -------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string for OpenAI-style `messages`, rendered with the chat template.

        The template sees `messages`, `add_generation_prompt`, `tools`, `bos_token`,
        `eos_token` (and unk/pad tokens when defined) plus `kwargs`. `chat_template=`
        replaces the model's own template.
        """
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise UnsupportedOperationError(
                f"the model ({self._source}) has no chat template; pass a raw prompt to "
                "generate() instead of chat(), or supply a template with chat_template="
            )
        variables = {**self._template_tokens, **kwargs}
        return compile_chat_template(source).render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._source} vocab_size={self.vocab_size}>"
