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
"""

from __future__ import annotations

import difflib
import json
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
from llama_engine import Completion, LlamaEngine, SamplingParams

__all__ = ["ForcedCall", "arun_forced", "forced_call", "run_forced"]

Step = tuple[str, dict[str, Any]]
"""(text the model continues, sampling overrides for this step: stop, max_tokens)."""

_STRING_TOKENS = 64  # most tokens one value may take
_SCALAR_TOKENS = 12
_FREE_TOKENS = 96
_SCALAR_STOP = [",", "}", "\n"]
_NUMBER_STARTS = ["-", *"0123456789"]
_NUMBER = re.compile(r"\s*\"?(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


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
        self.generated = 0
        self.cached: int | None = None

    def generate(self, overrides: dict[str, Any]) -> Generator[Step, Completion, Completion]:
        if self.budget <= 0:
            raise _Abort("max_tokens ran out before the call was complete")
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
    try:
        if name is None:
            names = list(functions)
            w.steps_left = 1 + max(_count_values(f.get("parameters") or {})
                                   for f in functions.values())
            picked = (yield from w.choose(names)) if len(names) > 1 else 0
            if picked is None:
                picked = names.index(_closest((yield from w.step(['"', "\n"], 16)), names))
            name = names[picked]
        w.text += f'{name}", "arguments":'
        schema = functions[name].get("parameters") or {"type": "object", "properties": {}}
        w.steps_left = _count_values(schema)
        args = yield from _value(w, schema, schema)
        call: ToolCall | InvalidToolCall = ToolCall(name=name, arguments=args, id=new_call_id())
    except _Abort as e:
        call = InvalidToolCall(text=w.text[len(prompt):], error=str(e), name=name,
                               id=new_call_id())
    else:
        w.text += f"}}\n{TOOL_CALL_CLOSE}"
    return ForcedCall(text=w.text[len(prompt):], call=call, completion_tokens=w.generated,
                      cached_tokens=w.cached or 0)


def _value(w: _Writer, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Generator[
        Step, Completion, Any]:
    """Write one value of `schema` after `"key":` (each value brings its own leading space)."""
    schema = _resolve(schema, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if "const" in schema:
        value = schema["const"]
    elif "enum" in schema:
        value = yield from _enum(w, list(schema["enum"]))
    elif kind == "object" and "properties" in schema:
        value = {}
        w.text += " {"
        for i, (key, sub) in enumerate(schema["properties"].items()):
            w.text += ("" if i == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ":"
            value[key] = yield from _value(w, sub, root)
        w.text += "}"
        return value
    elif kind == "string":
        w.text += ' "'
        value = yield from w.step(['"', "\n"], _STRING_TOKENS)
        w.text += json.dumps(value, ensure_ascii=False)[1:]
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
    w.text += " " + json.dumps(value, ensure_ascii=False)
    return value


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
    value = float(m.group(1))
    return int(value) if integer or value.is_integer() else value


def _enum(w: _Writer, options: list[Any]) -> Generator[Step, Completion, Any]:
    """One of `options`, picked by a biased token when they start differently, else written
    freely and matched to the closest."""
    strings = all(isinstance(o, str) for o in options)
    if strings:
        w.text += ' "'
    shown = [o if strings else " " + json.dumps(o) for o in options]
    picked = yield from w.choose(shown)
    if picked is None:
        said = yield from w.step(['"', *_SCALAR_STOP], _SCALAR_TOKENS)
        picked = shown.index(_closest(said if strings else " " + said.strip(), shown))
    if strings:
        w.text = w.text[:-2]
    return options[picked]


def _count_values(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> int:
    """How many values the model will write for `schema` (one step each)."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema or schema.get("type") == "null":
        return 0
    if schema.get("type") == "object" and "properties" in schema:
        return sum(_count_values(sub, root) for sub in schema["properties"].values())
    return 1


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local `$ref` and pick the first non-null branch of anyOf/oneOf/allOf."""
    for _ in range(16):
        if "$ref" in schema and str(schema["$ref"]).startswith("#/"):
            node: Any = root
            for part in str(schema["$ref"])[2:].split("/"):
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
            schema = node
            continue
        for key in ("anyOf", "oneOf", "allOf"):
            branches = [b for b in schema.get(key, ()) if b.get("type") != "null"]
            if branches:
                schema = branches[0]
                break
        else:
            return schema
    return schema


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
