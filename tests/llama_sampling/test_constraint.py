"""llama_sampling.constraint on the vocabularies we ship (SmolLM2's byte-level BPE, Gemma 3's
262k SentencePiece pieces): whatever the logits, the masked choices spell a valid answer."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from llama_engine import InvalidParamsError
from llama_models import resolve_model_path
from llama_models.checkpoint import read_checkpoint
from llama_sampling.constraint import Constraint, Grammar
from llama_tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "tags", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 8}},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def _smollm2() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(
        read_checkpoint(resolve_model_path("smollm2-135m-instruct")).metadata)


def _follow(c: Constraint, tok: Tokenizer, rng: np.random.Generator, limit: int = 300
            ) -> list[int]:
    """Random logits through the mask until the grammar is done (or the model ends)."""
    out: list[int] = []
    while not c.finished:
        logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 4
        c.mask(logits)
        token = int(np.argmax(logits))
        c.advance(token)
        if token in tok.eog_ids:
            break
        out.append(token)
        assert len(out) < limit
    return out


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_random_logits_through_the_mask_spell_valid_json(model: str) -> None:
    tok = Tokenizer.from_gguf_metadata(read_checkpoint(resolve_model_path(model)).metadata)
    grammar = Grammar.compile({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, tok)
    rng = np.random.default_rng(0)
    for _ in range(3):
        value = json.loads(tok.decode(_follow(grammar.constraint(), tok, rng, limit=400)))
        assert set(value) == {"name", "tags", "age"} and 0 <= value["age"] <= 150
        assert len(value["name"]) <= 12 and len(value["tags"]) <= 3


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
         {"type": "function", "function": {"name": "now"}}]  # no parameters at all


def test_a_required_call_is_a_call_to_one_of_the_tools() -> None:
    tok = _smollm2()
    grammar = Grammar.compile({"type": "tool_calls", "tools": TOOLS}, tok)
    rng = np.random.default_rng(1)
    names = set()
    for _ in range(6):
        call = json.loads(tok.decode(_follow(grammar.constraint(), tok, rng)))
        assert set(call) == {"name", "arguments"}
        names.add(call["name"])
        if call["name"] == "get_weather":
            assert isinstance(call["arguments"]["city"], str)
            assert set(call["arguments"]) <= {"city", "days"}  # closed: no invented keys
        else:
            assert call == {"name": "now", "arguments": {}}
    named = Grammar.compile({"type": "tool_calls", "tools": TOOLS, "name": "now"}, tok)
    assert json.loads(tok.decode(_follow(named.constraint(), tok, rng)))["name"] == "now"


def test_a_lazy_call_grammar_waits_for_the_trigger_then_constrains_one_call() -> None:
    tok = _smollm2()
    grammar = Grammar.compile({"type": "tool_calls", "tools": TOOLS, "lazy": True}, tok)
    c, rng = grammar.constraint(), np.random.default_rng(2)
    for token in tok.encode("Let me look that up. <tool_call>", add_special=False):
        logits = rng.standard_normal(tok.vocab_size).astype(np.float32)
        before = logits.copy()
        c.mask(logits)  # free text: nothing is masked
        assert np.array_equal(logits, before)
        c.advance(token)
    body: list[int] = []
    while True:  # in force: random logits still spell one call and its closing tag
        logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 4
        c.mask(logits)
        assert np.isinf(logits).any()
        token = int(np.argmax(logits))
        body.append(token)
        c.advance(token)
        if tok.decode(body).endswith("</tool_call>"):
            break
        assert len(body) < 300
    text = tok.decode(body)
    assert json.loads(text.strip().removesuffix("</tool_call>"))["name"] in ("get_weather", "now")
    logits = rng.standard_normal(tok.vocab_size).astype(np.float32)
    before = logits.copy()
    c.mask(logits)  # the call is closed: free again, and never finished
    assert np.array_equal(logits, before) and not c.finished


def test_a_trigger_inside_a_token_hands_the_rest_of_the_token_to_the_grammar() -> None:
    tok = _smollm2()
    grammar = Grammar.compile({"type": "tool_calls", "tools": TOOLS, "lazy": True}, tok)
    opener = tok.encode('<tool_call>\n{"', add_special=False)
    c = grammar.constraint()
    for token in opener:
        c.advance(token)
    logits = np.zeros(tok.vocab_size, np.float32)
    c.mask(logits)  # after '{"' only a tool's name key may follow
    allowed = {tok.decode([i]) for i in np.flatnonzero(np.isfinite(logits))}
    assert allowed and all("name".startswith(a) or a.startswith("name") for a in allowed)


@pytest.mark.parametrize(("fmt", "match"), [
    ({"type": "tool_calls", "tools": []}, "non-empty list"),
    ({"type": "tool_calls", "tools": TOOLS, "name": "nope"}, "not one of its tools"),
    ({"type": "tool_calls", "tools": [{"function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}]}, "not a valid grammar"),
    ({"type": "tool_calls", "tools": [{"function": {"name": "f", "parameters": {
        "$ref": "#/nowhere"}}}]}, "not a valid grammar"),
])
def test_bad_tools_are_typed_errors_at_compile_time(fmt: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidParamsError, match=match):
        Grammar.compile(fmt, _smollm2())


# Recursive schemas (a linked list, a tree, a self-reference) compile and are followed to an
# end: llguidance's grammar is recursive, there is no depth to unroll.
LINKED = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "required": ["value"],
                                                     "properties": {
    "value": {"type": "string", "maxLength": 4},
    "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}}}
TREE = {"type": "object", "properties": {
    "a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"$ref": "#"}}}


@pytest.mark.parametrize("schema", [LINKED, TREE])
def test_recursive_tool_schemas_are_followed(schema: dict[str, Any]) -> None:
    tok = _smollm2()
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    grammar = Grammar.compile({"type": "tool_calls", "tools": tools}, tok)
    rng = np.random.default_rng(3)
    for _ in range(3):
        out = _follow(grammar.constraint(), tok, rng, limit=2000)
        assert json.loads(tok.decode(out))["name"] == "f"


def test_closing_finishes_the_json_within_the_budget() -> None:
    """With random logits a value never ends by itself; closing for the last tokens of the
    budget ends every string, array and object in time, and says it did."""
    tok = _smollm2()
    schema = {"type": "object", "required": ["a", "b", "c"], "properties": {
        "a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}},
        "c": {"type": "object", "required": ["d"], "properties": {"d": {"type": "string"}}}}}
    grammar = Grammar.compile({"type": "json_schema", "json_schema": {"schema": schema}}, tok)
    rng = np.random.default_rng(4)
    budget = 48
    for _ in range(5):
        c, out = grammar.constraint(), []
        while len(out) < budget and not c.finished:
            logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 4
            c.mask(logits, closing=budget - len(out) <= 20)
            token = int(np.argmax(logits))
            c.advance(token)
            if token in tok.eog_ids:
                break
            out.append(token)
        value = json.loads(tok.decode(out))
        assert set(value) == {"a", "b", "c"} and set(value["c"]) == {"d"}
        assert c.closed_early


def test_only_json_grammars_close_near_the_budget() -> None:
    tok = _smollm2()
    closing = {"json_object": {"type": "json_object"}, "tool_calls": {
        "type": "tool_calls", "tools": TOOLS}, "json_schema": {
        "type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    for fmt in closing.values():
        assert Grammar.compile(fmt, tok).constraint().closes
    for fmt in ({"type": "regex", "pattern": "[a-z ]+"}, {"type": "choice", "choices": ["a"]},
                {"type": "grammar", "lark": 'start: "x"+'}):
        assert not Grammar.compile(fmt, tok).constraint().closes
