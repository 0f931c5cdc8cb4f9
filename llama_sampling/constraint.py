"""Constrained decoding: a token mask each step from a JSON schema, a regex, a choice list or a
Lark grammar, computed by llguidance (bench/grammar_engines.py measures it against xgrammar on
our vocabularies: no dependencies, ~1 ms to compile a schema whatever the vocabulary, tens of
microseconds a mask, control tokens kept out of the text).

    grammar = Grammar.compile(response_format, vocabulary)   # at submission: typed errors
    c = grammar.constraint()                                  # one per request
    c.mask(logits)          # disallowed tokens -> -inf, in place
    c.advance(token_id)     # after sampling
    c.finished              # the grammar is complete and ended

`response_format` takes OpenAI's forms and a few of its own:
{"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {...}}} (or
"schema" at the top level), {"type": "regex", "pattern": ...}, {"type": "choice", "choices":
[...]}, {"type": "grammar", "lark": ...}, or a pydantic model class.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from llama_engine.errors import InvalidParamsError

__all__ = ["Constraint", "Grammar", "Vocabulary"]


class Vocabulary(Protocol):
    """What a grammar needs of a tokenizer (llama_tokenizer.Tokenizer has it)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...

    def encode(self, text: str, *, add_special: bool = ..., parse_special: bool = ...
               ) -> list[int]: ...


_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as json.dumps writes it, one space after separators and nowhere else: a model may not
pad a value with whitespace forever (a schema's "x-guidance" overrides it)."""

_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(vocab: Vocabulary) -> Any:
    """llguidance's view of a vocabulary, built once per tokenizer (~0.1 s for 49k tokens, ~1 s
    for 262k): each token's bytes, the special ones apart, generation ending at its eog ids."""
    import llguidance

    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(vocab)
        if found is None:
            found = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(vocab)),
                                           eos_token=sorted(vocab.eog_ids) or None)
            _TOKENIZERS[vocab] = found
        return found


class _Wrapped:
    """The attributes llguidance.TokenizerWrapper reads."""

    def __init__(self, vocab: Vocabulary) -> None:
        n = vocab.vocab_size
        self.tokens = [vocab.token_bytes(i) for i in range(n)]
        self.special_token_ids = [i for i in range(n) if vocab.is_special(i)]
        self.eos_token_id = vocab.eos_id
        self.bos_token_id = vocab.bos_id
        self._vocab = vocab

    def __call__(self, text: str) -> list[int]:
        return self._vocab.encode(text, add_special=False, parse_special=False)


def _closed(schema: Any) -> Any:
    """A pydantic model's schema with its objects closed (additionalProperties false where it
    says nothing): the model's fields are the answer, as OpenAI's strict mode has it; a schema
    given as a dict keeps JSON Schema's own default."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _grammar_text(response_format: Any) -> str:
    """llguidance's grammar for a response_format (see the module docstring), or a typed error
    saying what is accepted."""
    import llguidance

    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        schema = _closed(response_format.model_json_schema())
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             defaults=_JSON_LAYOUT)
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise InvalidParamsError(
            "response_format must be a dict with a 'type' (json_object, json_schema, regex, "
            f"choice, grammar) or a pydantic model class, got {type(response_format).__name__}")
    kind = response_format["type"]
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                             defaults=_JSON_LAYOUT)
    if kind == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise InvalidParamsError(
                "response_format json_schema needs {'json_schema': {'schema': {...}}} (or "
                "'schema' beside 'type')")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             defaults=_JSON_LAYOUT)
    if kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str):
            raise InvalidParamsError("response_format regex needs a 'pattern' string")
        return llguidance.LLMatcher.grammar_from_regex(pattern)
    if kind == "choice":
        choices = response_format.get("choices")
        if (not isinstance(choices, Sequence) or isinstance(choices, str) or not choices
                or not all(isinstance(c, str) for c in choices)):
            raise InvalidParamsError("response_format choice needs 'choices', a list of strings")
        return llguidance.grammar_from("choice", json.dumps(list(choices)))
    if kind == "grammar":
        lark = response_format.get("lark")
        if not isinstance(lark, str):
            raise InvalidParamsError("response_format grammar needs a 'lark' grammar string")
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise InvalidParamsError(
        f"response_format type {kind!r} is not one of json_object, json_schema, regex, choice, "
        "grammar")


class Grammar:
    """A response_format compiled against one vocabulary; `constraint()` makes a request's
    state. Compiling checks the grammar: a bad schema, regex or grammar is an
    InvalidParamsError here, before any decoding."""

    def __init__(self, text: str, vocab: Vocabulary) -> None:
        self._text, self._vocab = text, vocab
        self._tokenizer = _ll_tokenizer(vocab)

    @classmethod
    def compile(cls, response_format: Any, vocab: Vocabulary) -> Grammar:
        import llguidance

        try:
            text = _grammar_text(response_format)
        except InvalidParamsError:
            raise
        except (ValueError, TypeError, RuntimeError) as e:  # llguidance's own refusals
            raise InvalidParamsError(f"response_format is not a valid grammar: {e}") from e
        grammar = cls(text, vocab)
        probe = llguidance.LLMatcher(grammar._tokenizer, text, log_level=0)
        if probe.is_error():
            raise InvalidParamsError(f"response_format is not a valid grammar: "
                                     f"{probe.get_error()}")
        return grammar

    def constraint(self) -> Constraint:
        return Constraint(self)


_MASKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-grammar")
"""Where the next step's masks are computed, while the model computes that step (llguidance
releases the GIL)."""


class Constraint:
    """One request's position in its grammar. The mask for the next token is computed in the
    background as soon as the previous one is known (`advance`), so it is ready, or nearly, when
    the step's logits arrive; `mask` and `advance` are called in turn from one thread."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance
        import llguidance.numpy

        self._vocab_size = grammar._vocab.vocab_size
        self._matcher = llguidance.LLMatcher(grammar._tokenizer, grammar._text, log_level=0)
        self._bits = llguidance.numpy.allocate_token_bitmask(1, self._vocab_size)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._next: Future[np.ndarray] = _MASKS.submit(self._banned)

    def _banned(self) -> np.ndarray:
        """One byte a token, True where the grammar does not allow it next."""
        self._fill(self._matcher, self._bits, 0)
        return np.unpackbits(~self._bits.view(np.uint8)[0], count=self._vocab_size,
                             bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of the tokens the grammar does not allow next to -inf (in place; the
        last axis is the vocabulary, which may be padded past the tokenizer's)."""
        np.copyto(logits[..., :self._vocab_size], -np.inf, where=self._next.result())
        logits[..., self._vocab_size:] = -np.inf

    def advance(self, token_id: int) -> None:
        """Record the sampled token (one `mask` allowed), and start the next mask."""
        self._next.result()  # the matcher is the background fill's until it is done
        if not self._matcher.consume_token(token_id):
            raise InvalidParamsError(
                f"token {token_id} does not follow the grammar: {self._matcher.get_error()}")
        if not self._matcher.is_stopped():
            self._next = _MASKS.submit(self._banned)

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing more may follow."""
        self._next.result()
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What came so far is a complete answer (it may still go on)."""
        self._next.result()
        return bool(self._matcher.is_accepting())
