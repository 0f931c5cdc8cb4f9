"""Forced tool calls (`tool_choice` "any"/"required" or a tool's name), written key by key.

Asked for a call, a small model often copies the tool's schema instead of filling in arguments.
When the caller *requires* a call there is no need to let it: the adapter writes the JSON
scaffolding itself -- `<tool_call>\\n{"name": "<tool>", "arguments": {"<key>": ` -- and the model
writes only each value, stopped at the value's end (the closing quote of a string, the comma or
brace after a number). Values are parsed and re-serialised, so the result is always valid JSON of
the tool's shape. This is the prompt-level cousin of grammar-constrained decoding (llama.cpp's
GBNF, vLLM's guided decoding), built only on `LlamaEngine.generate`: every step continues the
text so far, and the engine's prefix cache means each step prefills only the new tokens.

The steps are a generator (`forced_call`) that yields (text to continue, sampling overrides)
and is sent each step's `Completion`; `run_forced` / `arun_forced` drive it sync or async.

Whatever the schema and the model's replies, the outcome is a `ToolCall` or an
`InvalidToolCall`: a recursive `$ref` is followed at most `_MAX_NESTING` objects deep (below
that the model writes the value as free JSON), the values counted ahead are capped, malformed
schema nodes count as "any value", one call takes at most `_MAX_STEPS` steps, and every value
written must serialise as strict JSON (no `Infinity` from a `1e999`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters._tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    InvalidToolCall,
    ToolCall,
    loads_lenient,
    new_call_id,
)
from llama_engine import Completion, InvalidParamsError, LlamaEngine, SamplingParams

__all__ = ["ForcedCall", "arun_forced", "forced_call", "run_forced"]

Step = tuple[str, dict[str, Any]]
"""(text the model continues, sampling overrides for this step: stop, max_tokens)."""

_STRING_TOKENS = 64  # most tokens one value may take
_SCALAR_TOKENS = 12
_FREE_TOKENS = 96
_SCALAR_STOP = [",", "}", "\n"]
_NUMBER_STARTS = ["-", *"0123456789"]
_NUMBER = re.compile(r"\s*\"?(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_MAX_NESTING = 8  # objects written key by key, at most this deep; deeper ones are free JSON
_MAX_VALUES = 256  # values counted ahead (to share the budget) at most
_MAX_STEPS = 512  # generation steps in one call at most (a wide recursive schema ends here)
_Schema = Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class ForcedCall:
    """The outcome: the assistant text as written, the call, and how many tokens the model made
    (scaffolding excluded)."""

    text: str
    call: ToolCall | InvalidToolCall
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens the first step found in the engine's prefix cache."""


class _Abort(Exception):
    """A value the model wrote does not fit the schema; the call becomes an InvalidToolCall."""


class _Writer:
    """The text so far and the token budget. Each step may take an even share of what is left
    (`steps_left` counts the values still to write), so one long-winded string cannot starve
    the values after it: a value cut short by its share is kept as written."""

    def __init__(self, text: str, budget: int, tokenize: Callable[[str], list[int]]) -> None:
        self.text = text
        self.budget = budget
        self.tokenize = tokenize
        self.steps_left = 1
        self.steps = 0
        self.generated = 0
        self.cached: int | None = None

    def generate(self, overrides: dict[str, Any]) -> Generator[Step, Completion, Completion]:
        if self.budget <= 0:
            raise _Abort("max_tokens ran out before the call was complete")
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise _Abort(f"the tool's schema asks for more than {_MAX_STEPS} values")
        completion = yield self.text, overrides
        n = completion.usage.completion_tokens
        if self.cached is None:
            self.cached = completion.usage.cached_tokens
        self.budget -= n
        self.generated += n
        return completion

    def step(self, stop: list[str], cap: int) -> Generator[Step, Completion, str]:
        """Free text until a stop string, within this value's share of the budget."""
        share = max(1, self.budget // max(1, self.steps_left))
        self.steps_left -= 1
        completion = yield from self.generate({"stop": stop, "max_tokens": min(cap, share)})
        return completion.text

    def choose(self, options: list[str]) -> Generator[Step, Completion, int | None]:
        """One token, biased to the first tokens of `options` (logit_bias +100, so nothing else
        can win): the index of the option the model prefers. None when two options start with
        the same token (the caller falls back to free text)."""
        firsts = [self.tokenize(o)[:1] for o in options]
        ids = [f[0] for f in firsts if f]
        if len(ids) < len(options) or len(set(ids)) < len(ids):
            return None
        self.steps_left -= 1
        completion = yield from self.generate(
            {"stop": (), "max_tokens": 1, "logit_bias": dict.fromkeys(ids, 100.0)})
        token = completion.token_ids[0] if completion.token_ids else None
        return ids.index(token) if token in ids else None


def forced_call(
    prompt: str,
    tools: Sequence[Mapping[str, Any]],
    name: str | None,
    *,
    max_tokens: int,
    tokenize: Callable[[str], list[int]],
) -> Generator[Step, Completion, ForcedCall]:
    """The steps of one forced call after `prompt` (a rendered chat prompt ending where the
    assistant's reply starts). `name` picks the tool; None lets the model choose among `tools`
    (OpenAI tool dicts). `tokenize` gives the ids of a piece of text (no special tokens)."""
    w = _Writer(prompt + f'{TOOL_CALL_OPEN}\n{{"name": "', max_tokens, tokenize)
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if not functions or (name is not None and name not in functions):
        raise InvalidParamsError(
            f"a tool call is required, but {'no tools are' if not functions else repr(name)} "
            f"{'bound' if not functions else 'is not among the bound tools'}; bind the tool "
            "with bind_tools(...) or let the model choose (tool_choice='auto')")
    try:
        if name is None:
            names = list(functions)
            w.steps_left = 1 + max(_count_values(_parameters(f)) for f in functions.values())
            picked = (yield from w.choose(names)) if len(names) > 1 else 0
            if picked is None:
                picked = names.index(_closest((yield from w.step(['"', "\n"], 16)), names))
            name = names[picked]
        w.text += f'{_dumps(name)[1:-1]}", "arguments":'
        schema = _parameters(functions[name])
        w.steps_left = _count_values(schema)
        args = yield from _value(w, schema, schema)
        if not isinstance(args, dict):
            raise _Abort(f"the tool's parameters are not an object schema, got {args!r:.40}")
        call: ToolCall | InvalidToolCall = ToolCall(name=name, arguments=args, id=new_call_id())
    except _Abort as e:
        call = InvalidToolCall(text=w.text[len(prompt):], error=str(e), name=name,
                               id=new_call_id())
    else:
        w.text += f"}}\n{TOOL_CALL_CLOSE}"
    return ForcedCall(text=w.text[len(prompt):], call=call, completion_tokens=w.generated,
                      cached_tokens=w.cached or 0)


def _value(w: _Writer, schema: Any, root: _Schema, depth: int = 0) -> Generator[
        Step, Completion, Any]:
    """Write one value of `schema` after `"key":` (each value brings its own leading space).
    `depth` counts the objects around it; from `_MAX_NESTING` on, objects are free JSON."""
    schema = _resolve(schema, root)
    kind = _kind(schema)
    if "const" in schema:
        value = schema["const"]
    elif "enum" in schema:
        value = yield from _enum(w, _options(schema["enum"]))
    elif _keyed(schema, depth):
        value = {}
        w.text += " {"
        for i, (key, sub) in enumerate(schema["properties"].items()):
            w.text += ("" if i == 0 else ", ") + _dumps(str(key)) + ":"
            value[str(key)] = yield from _value(w, sub, root, depth + 1)
        w.text += "}"
        return value
    elif kind == "string":
        w.text += ' "'
        value = yield from w.step(['"', "\n"], _STRING_TOKENS)
        w.text += _dumps(value)[1:]
        return value
    elif kind in ("integer", "number"):
        value = yield from _number(w, integer=kind == "integer")
    elif kind == "boolean":
        value = yield from _enum(w, [True, False])
    elif kind == "null":
        value = None
    else:  # arrays, free-form objects, anything else: let the model write JSON, then parse it
        opener = "[" if kind == "array" else "{" if kind == "object" else ""
        w.text += " " + opener
        said = yield from w.step(["\n"], _FREE_TOKENS)
        try:
            value = loads_lenient(opener + said)
        except ValueError as e:
            raise _Abort(f"the model wrote no valid JSON value: {e}") from None
        w.text = w.text[: len(w.text) - len(opener) - 1]
    w.text += " " + _dumps(value)
    return value


def _dumps(value: Any) -> str:
    """`value` as strict JSON; a value that has none (a non-finite number, an object of no JSON
    type, nesting too deep) aborts the call."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise _Abort(f"the value {value!r:.40} is not JSON ({e})") from None


def _parameters(function: Mapping[str, Any]) -> _Schema:
    params = function.get("parameters")
    return params if isinstance(params, Mapping) and params else {
        "type": "object", "properties": {}}


def _kind(schema: _Schema) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return kind


def _keyed(schema: _Schema, depth: int) -> bool:
    """Whether `schema` is an object written key by key (else the model writes it freely)."""
    return (_kind(schema) == "object" and isinstance(schema.get("properties"), Mapping)
            and depth < _MAX_NESTING)


def _options(enum: Any) -> list[Any]:
    options = list(enum) if isinstance(enum, list | tuple) else []
    if not options:
        raise _Abort(f"the schema's enum has no options to pick from, got {enum!r:.40}")
    return options


def _number(w: _Writer, *, integer: bool) -> Generator[Step, Completion, int | float]:
    """A number: its first character is picked among digits and "-" by a biased token (a small
    model would rather write more JSON schema), the rest is written freely up to a comma."""
    mark = len(w.text)
    w.text += " "
    w.steps_left += 1  # two steps for this value
    lead = ""
    picked = yield from w.choose(_NUMBER_STARTS)
    if picked is not None:
        lead = _NUMBER_STARTS[picked]
        w.text += lead
    said = lead + (yield from w.step([*_SCALAR_STOP, " "], _SCALAR_TOKENS))
    w.text = w.text[:mark]
    m = _NUMBER.match(said)
    if m is None:
        raise _Abort(f"expected a number, the model wrote {said[:40]!r}")
    text = m.group(1)
    if re.fullmatch(r"-?\d+", text):
        return int(text)  # exact, however long
    value = float(text)
    if not math.isfinite(value):
        raise _Abort(f"the number {text} is out of range (JSON numbers must be finite)")
    return int(value) if integer or value.is_integer() else value


def _enum(w: _Writer, options: list[Any]) -> Generator[Step, Completion, Any]:
    """One of `options`, picked by a biased token when they start differently, else written
    freely and matched to the closest."""
    strings = all(isinstance(o, str) for o in options)
    if strings:
        w.text += ' "'
    shown = [o if strings else " " + _dumps(o) for o in options]
    picked = yield from w.choose(shown)
    if picked is None:
        said = yield from w.step(['"', *_SCALAR_STOP], _SCALAR_TOKENS)
        picked = shown.index(_closest(said if strings else " " + said.strip(), shown))
    if strings:
        w.text = w.text[:-2]
    return options[picked]


def _count_values(
    schema: Any, root: _Schema | None = None, depth: int = 0, cap: int = _MAX_VALUES
) -> int:
    """How many values the model will write for `schema` (one step each), at most `cap`."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema or _kind(schema) == "null":
        return 0
    if not _keyed(schema, depth):
        return 1
    total = 0
    for sub in schema["properties"].values():
        total += _count_values(sub, root, depth + 1, cap - total)
        if total >= cap:
            return cap
    return total


def _resolve(schema: Any, root: Any) -> _Schema:
    """Follow a local `$ref` and pick the first non-null branch of anyOf/oneOf/allOf (at most
    16 hops: a `$ref` to itself ends as "any value"). A node that is not an object (JSON
    Schema's `true`, a broken reference) means "any value": {}."""
    for _ in range(16):
        if not isinstance(schema, Mapping):
            return {}
        ref = str(schema.get("$ref", ""))
        if ref == "#" or ref.startswith("#/"):
            node: Any = root
            for part in ref[2:].split("/") if ref != "#" else ():
                part = part.replace("~1", "/").replace("~0", "~")
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
            schema = node
            continue
        for key in ("anyOf", "oneOf", "allOf"):
            alternatives = schema.get(key, ())
            branches = [b for b in alternatives if isinstance(b, Mapping)
                        and b.get("type") != "null"] if isinstance(alternatives, list) else []
            if branches:
                schema = branches[0]
                break
        else:
            return schema
    return {}


def _closest(said: str, options: list[str]) -> str:
    said = said.strip()
    if said in options:
        return said
    return max(options, key=lambda o: difflib.SequenceMatcher(None, said, o).ratio())


def run_forced(
    engine: LlamaEngine, steps: Generator[Step, Completion, ForcedCall], params: SamplingParams
) -> ForcedCall:
    """Drive `steps` with blocking `engine.generate` calls."""
    try:
        text, overrides = next(steps)
        while True:
            ids = engine.tokenize(text, add_special=False)
            completion = engine.generate(ids, params=params.replace(**overrides))
            text, overrides = steps.send(completion)
    except StopIteration as done:
        return done.value


async def arun_forced(
    engine: LlamaEngine, steps: Generator[Step, Completion, ForcedCall], params: SamplingParams
) -> ForcedCall:
    """Drive `steps` with `await engine.agenerate`; cancelling the task stops the step."""
    try:
        text, overrides = next(steps)
        while True:
            ids = engine.tokenize(text, add_special=False)
            completion = await engine.agenerate(ids, params=params.replace(**overrides))
            text, overrides = steps.send(completion)
    except StopIteration as done:
        return done.value
