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

`{"type": "tool_calls", "tools": [...], "name": None, "lazy": bool}` is what a chat with tools
uses (`llama_engine.tools`): the JSON of a call to one of the (OpenAI-style) tools, or to the
named one. Lazy, it waits for the model to open a call (`<tool_call>`), constrains that call
up to its closing tag, and waits again: the model chooses freely between text and calls, and
the calls it makes are well formed. Not lazy, the call is all the reply may be.
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


_CLOSERS: weakref.WeakKeyDictionary[
    Any, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = weakref.WeakKeyDictionary()
_CLOSING_BYTES = frozenset(b'"}] ')


def _closers(vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens made only of closing bytes `"`, `}`, `]` (and the space JSON's separators end
    with); those of them that start with `"`; a lone comma, which ends a number; the
    end-of-generation tokens), once per vocabulary."""
    with _TOKENIZERS_LOCK:
        found = _CLOSERS.get(vocab)
        if found is None:
            pieces = [b"" if vocab.is_special(i) else vocab.token_bytes(i)
                      for i in range(vocab.vocab_size)]
            closing = np.array([bool(b.strip()) and _CLOSING_BYTES.issuperset(b)
                                for b in pieces])
            quote = closing & np.array([b[:1] == b'"' for b in pieces])
            comma = np.array([b.strip() == b"," for b in pieces])
            ends = np.zeros(vocab.vocab_size, dtype=bool)
            ends[[i for i in vocab.eog_ids if i < vocab.vocab_size]] = True
            found = _CLOSERS[vocab] = (closing, quote, comma, ends)
        return found


def closing_margin(max_tokens: int) -> int:
    """How many tokens before max_tokens a constrained reply starts closing (see
    `Constraint.mask`): a third of the budget, between 12 and 32."""
    return min(32, max(12, max_tokens // 3))


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


TOOL_CALL_TRIGGER = "<tool_call>"
"""What opens a call in a lazy tool-call grammar (llama_engine.tool_calls.TOOL_CALL_OPEN)."""


def _tool_calls_grammar(response_format: dict[str, Any]) -> str:
    """The grammar of one call to one of `tools` (or to the tool `name`): {"name": ...,
    "arguments": {...}} with the tool's parameters schema (objects closed where the schema says
    nothing, as OpenAI's strict mode); lazy, followed by the closing tag."""
    tools, name = response_format.get("tools"), response_format.get("name")
    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise InvalidParamsError("response_format tool_calls needs 'tools', a non-empty list")
    shapes: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidParamsError(
                "each tool must be {'type': 'function', 'function': {'name': ..., "
                f"'parameters': {{...}}}}}}, got {str(tool)[:200]}")
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        where = f"tool{len(definitions)}"
        definitions[where] = _rebased(_closed(parameters), f"#/$defs/{where}")
        shapes.append({"type": "object", "additionalProperties": False,
                       "required": ["name", "arguments"],
                       "properties": {"name": {"const": function["name"]},
                                      "arguments": {"$ref": f"#/$defs/{where}"}}})
    if not shapes:
        raise InvalidParamsError(f"response_format tool_calls names {name!r}, which is not "
                                 "one of its tools")
    schema = {"anyOf": shapes, "$defs": definitions, "x-guidance": _JSON_LAYOUT}
    call = f"call: %json {json.dumps(schema)}"
    if response_format.get("lazy"):
        return f'start: "\\n"? call "\\n"? "</tool_call>"\n{call}\n'
    return f"start: call\n{call}\n"


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with its local `$ref`s ("#", "#/$defs/X") pointing under `base`, where it is
    placed in a larger schema."""
    if isinstance(schema, dict):
        out = {k: _rebased(v, base) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
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
    if kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(_tool_calls_grammar(response_format))
    raise InvalidParamsError(
        f"response_format type {kind!r} is not one of json_object, json_schema, regex, choice, "
        "grammar, tool_calls")


class Grammar:
    """A response_format compiled against one vocabulary; `constraint()` makes a request's
    state. Compiling checks the grammar: a bad schema, regex or grammar is an
    InvalidParamsError here, before any decoding. `trigger`: the grammar applies only once the
    model has written it (a lazy grammar), and again after each time it completes."""

    def __init__(self, text: str, vocab: Vocabulary, *, trigger: str | None = None,
                 closes: bool = False) -> None:
        self._text, self._vocab = text, vocab
        self._tokenizer = _ll_tokenizer(vocab)
        self.closes = closes
        """JSON: near the end of the budget, the reply is steered to close (`Constraint.mask`).
        Other grammars (a regex, a choice, Lark) may end anywhere or nowhere near: left be."""
        _closers(vocab)  # built now, at submission, not in a step
        self.trigger = None if trigger is None else trigger.encode()

    @classmethod
    def compile(cls, response_format: Any, vocab: Vocabulary) -> Grammar:
        import llguidance

        try:
            text = _grammar_text(response_format)
        except InvalidParamsError:
            raise
        except (ValueError, TypeError, RuntimeError) as e:  # llguidance's own refusals
            raise InvalidParamsError(f"response_format is not a valid grammar: {e}") from e
        kind = response_format.get("type") if isinstance(response_format, dict) else "json"
        lazy = kind == "tool_calls" and bool(response_format.get("lazy"))
        grammar = cls(text, vocab, trigger=TOOL_CALL_TRIGGER if lazy else None,
                      closes=kind in ("json", "json_object", "json_schema", "tool_calls"))
        probe = llguidance.LLMatcher(grammar._tokenizer, text, log_level=0)
        if probe.is_error():
            raise InvalidParamsError(f"response_format is not a valid grammar: "
                                     f"{probe.get_error()}")
        return grammar

    def constraint(self, *, guess_first: bool = False) -> Constraint:
        return Constraint(self, guess_first=guess_first)


_MASKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-grammar")
"""Where the next step's masks are computed, while the model computes that step (llguidance
releases the GIL)."""


class Constraint:
    """One request's position in its grammar. The mask for the next token is computed in the
    background as soon as the previous one is known (`advance`), so it is ready, or nearly, when
    the step's logits arrive; `mask` and `advance` are called in turn from one thread.

    A lazy grammar's constraint masks nothing until the model writes the trigger; the text in
    the trigger's last token after the trigger itself is the grammar's first input."""

    def __init__(self, grammar: Grammar, *, guess_first: bool = False) -> None:
        import llguidance.numpy

        self.guess_first = guess_first
        """The caller samples first and asks `allows` (greedy decoding: exact when the model's
        choice is allowed); masks are then computed only when it is not, never ahead."""
        self._grammar = grammar
        self._vocab_size = grammar._vocab.vocab_size
        self._bits = llguidance.numpy.allocate_token_bitmask(1, self._vocab_size)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._matcher: Any = None
        self._seen = b""  # lazy, waiting: the tail of the text, to find the trigger in
        self._next: Future[np.ndarray] | None = None
        self.closed_early = False
        """`mask(closing=True)` narrowed a choice: the budget, not the model, ended a value."""
        self._text_state = _JsonText()
        self._stopped = False
        if grammar.trigger is None:
            self._start(b"")

    def _start(self, text: bytes) -> None:
        """Put the grammar in force, `text` its first input (the rest of a token)."""
        import llguidance

        g = self._grammar
        self._matcher = llguidance.LLMatcher(g._tokenizer, g._text, log_level=0)
        self._text_state = _JsonText()
        self._text_state.feed(text)
        if text:
            ids = g._vocab.encode(text.decode("utf-8", "replace"), add_special=False,
                                  parse_special=False)
            if not self._matcher.consume_tokens(ids):
                self._matcher = None  # not the start of a call: stay free (the reply's text
                return  # is parsed as written)
        self._ahead()

    def _ahead(self) -> None:
        """Start the next mask in the background, unless guessing first. (Making masks ahead
        for the tokens after a refused guess was tried: on two cores the extra fills cost
        more than the waits they save.)"""
        self._next = None if self.guess_first else _MASKS.submit(self._banned)

    @property
    def guessing(self) -> bool:
        """The caller should try its own choice first (`allows`): no mask is on its way."""
        return self.guess_first and self._next is None and self._matcher is not None

    def _banned(self) -> np.ndarray:
        """One byte a token, True where the grammar does not allow it next."""
        self._fill(self._matcher, self._bits, 0)
        return np.unpackbits(~self._bits.view(np.uint8)[0], count=self._vocab_size,
                             bitorder="little").view(bool)

    def _settled(self) -> None:
        if self._next is not None:
            self._next.result()  # the matcher is the background fill's until it is done

    def mask(self, logits: np.ndarray, *, closing: bool = False) -> None:
        """Set the logits of the tokens the grammar does not allow next to -inf (in place; the
        last axis is the vocabulary, which may be padded past the tokenizer's).

        `closing` (the token budget is nearly spent): of the allowed tokens, keep only the end
        of generation if the answer is complete, else the tokens that close a string, object
        or array if any is allowed, else a comma (which ends a number); so a JSON value is
        finished within the budget (its last values cut short) rather than cut off
        unparseable. Sets `closed_early` when that takes
        the model's own best choice away."""
        if self._matcher is None:
            return
        # guessing first, a refused guess makes the mask now; else it was started ahead
        banned = self._banned() if self._next is None else self._next.result()
        np.copyto(logits[..., :self._vocab_size], -np.inf, where=banned)
        logits[..., self._vocab_size:] = -np.inf
        if not closing:
            return
        allowed = ~banned
        closing_tokens, quotes, commas, ends = _closers(self._grammar._vocab)
        inside = self._text_state.in_string
        tiers = [allowed & ends, allowed & (quotes if inside else closing_tokens)]
        if not inside:  # a number ends at a comma too (when no bracket may close yet)
            tiers.append(allowed & commas)
        for keep in tiers:
            if keep.any():
                if not keep[int(np.argmax(logits[..., :self._vocab_size]))]:
                    self.closed_early = True  # the model's own choice was taken away
                np.copyto(logits[..., :self._vocab_size], -np.inf, where=~keep)
                return

    def advance(self, token_id: int) -> None:
        """Record the sampled token (one `mask` allowed), and start the next mask."""
        if self._matcher is None:
            self._watch(token_id)
            return
        self._settled()
        if not self._matcher.consume_token(token_id):
            raise InvalidParamsError(
                f"token {token_id} does not follow the grammar: {self._matcher.get_error()}")
        self._text_state.feed(self._grammar._vocab.token_bytes(token_id))
        self._stopped = bool(self._matcher.is_stopped())
        if not self._stopped:
            self._ahead()
        elif self._grammar.trigger is not None:  # a lazy grammar, complete: wait again
            self._matcher, self._next, self._stopped = None, None, False

    @property
    def closes(self) -> bool:
        return self._grammar.closes

    def forced(self) -> int | None:
        """The only token the grammar allows next, when it forces text (a key, a separator),
        tokenized as the tokenizer would; else None."""
        if self._matcher is None:
            return None
        self._settled()
        tokens = self._matcher.compute_ff_tokens()
        return int(tokens[0]) if tokens else None

    def allows(self, token_id: int, *, closing: bool = False) -> bool:
        """Whether `token_id` is what `mask` would leave the model's top choice to be: the
        grammar allows it next and, `closing`, it ends the reply or closes a value while ending
        is not allowed (a microsecond or two; no mask is made)."""
        if self._matcher is None:
            return True
        self._settled()
        forced = self.forced()
        if forced is not None:  # the grammar's text is written canonically: one token
            return token_id == forced
        valid = self._matcher.validate_tokens
        if valid([token_id]) != 1:
            return False
        if not closing:
            return True
        ends = self._grammar._vocab.eog_ids
        if token_id in ends:
            return True
        closing_tokens, quotes, _, _ = _closers(self._grammar._vocab)
        closers = quotes if self._text_state.in_string else closing_tokens
        return bool(closers[token_id]) and not any(valid([e]) == 1 for e in ends)

    def _watch(self, token_id: int) -> None:
        trigger = self._grammar.trigger
        assert trigger is not None
        self._seen = (self._seen + self._grammar._vocab.token_bytes(token_id))[-256:]
        at = self._seen.find(trigger)
        if at >= 0:
            rest, self._seen = self._seen[at + len(trigger):], b""
            self._start(rest)

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing more may follow (never, for a lazy one). Read
        without waiting for the next mask: it is known when the token is consumed."""
        return self._stopped


class _JsonText:
    """Whether the text so far ends inside a JSON string (what closes it is a quote)."""

    __slots__ = ("escaped", "in_string")

    def __init__(self) -> None:
        self.in_string = self.escaped = False

    def feed(self, text: bytes) -> None:
        for byte in text:
            if self.escaped:
                self.escaped = False
            elif self.in_string and byte == 0x5C:  # backslash
                self.escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string
