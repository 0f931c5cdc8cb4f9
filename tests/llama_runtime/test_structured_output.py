"""response_format: the default model's replies parse and validate against varied schemas, a
regex, a choice list and a Lark grammar; streams still stream; a cut reply ends "length"; a bad
format is a typed error before any decoding; constrained and free requests share steps."""

from __future__ import annotations

import datetime
import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from llama_engine import InvalidParamsError
from llama_runtime.bench import at_once


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class City(Closed):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=50_000_000)


class Tags(Closed):
    tags: list[str] = Field(max_length=4)


class Address(Closed):
    street: str = Field(max_length=32)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(Closed):
    name: str = Field(max_length=24)
    address: Address


class Item(Closed):
    sku: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=99)


class Order(Closed):
    items: list[Item] = Field(min_length=1, max_length=3)


class Mood(Closed):
    mood: Literal["happy", "sad", "neutral"]


class Reading(Closed):
    celsius: float = Field(ge=-50, le=60)
    ok: bool


class MaybeNote(Closed):
    title: str = Field(max_length=24)
    note: str | None = Field(default=None, max_length=24)


class Pet(Closed):
    kind: Literal["cat", "dog"]
    name: str = Field(max_length=16)


class Plant(Closed):
    species: str = Field(max_length=24)


class Thing(Closed):
    thing: Pet | Plant  # anyOf


class Contact(Closed):
    email: str = Field(pattern=r"^[a-z]{1,12}@[a-z]{1,12}\.com$")


class Matrix(Closed):
    rows: list[list[int]] = Field(max_length=3)


class Event(Closed):
    day: datetime.date  # a string format
    title: str = Field(max_length=24)


class Score(Closed):
    player: str = Field(max_length=16)
    points: int = Field(ge=0, le=100)
    level: Literal[1, 2, 3]


SCHEMAS = [City, Tags, Person, Order, Mood, Reading, MaybeNote, Thing, Contact, Matrix, Event,
           Score]


@pytest.mark.parametrize("model", SCHEMAS, ids=[m.__name__ for m in SCHEMAS])
def test_replies_validate_against_the_schema(engine, model: type[BaseModel]) -> None:
    ask = [{"role": "user", "content": f"Reply with one {model.__name__} as JSON."}]
    for fmt in (model, {"type": "json_schema",
                        "json_schema": {"schema": model.model_json_schema()}}):
        done = engine.chat(ask, response_format=fmt, temperature=0.7, seed=3, max_tokens=200)
        assert done.finish_reason == "stop", done.text
        model.model_validate_json(done.text)  # raises unless it parses and validates


def test_json_object_regex_choice_and_grammar(engine) -> None:
    done = engine.chat([{"role": "user", "content": 'Return {"city": "Paris"} as JSON.'}],
                       response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert done.finish_reason == "stop" and isinstance(json.loads(done.text), dict)
    done = engine.generate("Today's date:", temperature=0.9, seed=5,
                           response_format={"type": "regex", "pattern": r"[0-9]{4}-[0-9]{2}"})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", done.text) and done.finish_reason == "stop"
    done = engine.generate("The sky is blue. True or false?", temperature=0,
                           response_format={"type": "choice", "choices": ["true", "false"]})
    assert done.text in ("true", "false")
    lark = 'start: "(" num " " op " " num ")"\nop: "+" | "-"\nnum: /[0-9]{1,3}/'
    done = engine.generate("An arithmetic expression:", temperature=0.8, seed=1,
                           response_format={"type": "grammar", "lark": lark})
    assert re.fullmatch(r"\([0-9]{1,3} [+-] [0-9]{1,3}\)", done.text), done.text


def test_a_constrained_stream_streams_and_a_cut_reply_ends_length(engine) -> None:
    ask = [{"role": "user", "content": "Describe Paris."}]
    chunks = list(engine.stream_chat(ask, response_format=City, temperature=0, max_tokens=200))
    assert len([c for c in chunks if c.text]) > 5
    City.model_validate_json("".join(c.text for c in chunks))
    cut = engine.chat(ask, response_format=City, temperature=0, max_tokens=4)
    assert cut.finish_reason == "length" and cut.text and "".join(
        c.text for c in chunks).startswith(cut.text)


@pytest.mark.parametrize("model", [City, Tags, Event], ids=["City", "Tags", "Event"])
def test_greedy_guessing_gives_the_masked_argmax(exact_engine, model: type[BaseModel]) -> None:
    """Greedy replies try the model's choice against the grammar before making a mask; asking
    for logprobs makes a mask every step. Both must pick the same tokens."""
    ask = [{"role": "user", "content": f"Reply with one {model.__name__} as JSON."}]
    guessed = exact_engine.chat(ask, response_format=model, temperature=0, max_tokens=60)
    masked = exact_engine.chat(ask, response_format=model, temperature=0, max_tokens=60,
                               logprobs=0)
    assert guessed.token_ids == masked.token_ids and guessed.text == masked.text


class Story(Closed):
    title: str
    lines: list[str]


def test_a_reply_near_max_tokens_is_closed_in_time_not_cut(engine) -> None:
    """Unbounded strings let a small model ramble past any budget; the last tokens of the
    budget close the JSON instead, so the reply still validates (and ends "length")."""
    ask = [{"role": "user", "content": "Write a very long story about a cat."}]
    for max_tokens in (24, 40, 64):
        done = engine.chat(ask, response_format=Story, temperature=0.8, seed=max_tokens,
                           max_tokens=max_tokens)
        Story.model_validate_json(done.text)
        assert done.usage.completion_tokens <= max_tokens
        assert done.finish_reason in ("stop", "length")


@pytest.mark.parametrize("fmt", [
    {"type": "regex", "pattern": "("},
    {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
    {"type": "json_schema"},
    {"type": "choice", "choices": []},
    {"type": "grammar", "lark": "start: undefined_rule"},
    {"type": "yaml"},
    "json",
])
def test_a_bad_format_is_refused_before_decoding(engine, fmt) -> None:
    before = engine.stats()["kv_blocks_used"]
    with pytest.raises(InvalidParamsError):
        engine.generate("Hello", response_format=fmt, max_tokens=4)
    assert engine.stats()["kv_blocks_used"] == before


def test_constrained_and_free_requests_share_steps(engine) -> None:
    prompts = [f"Request {i}: describe a city." for i in range(4)]

    def one(i: int) -> str:
        fmt = City if i % 2 == 0 else None
        return engine.generate(prompts[i], response_format=fmt, temperature=0,
                               max_tokens=120).text

    replies = at_once(one, len(prompts))
    for i, text in enumerate(replies):
        if i % 2 == 0:
            City.model_validate_json(text)
    assert replies[1] == engine.generate(prompts[1], temperature=0, max_tokens=120).text
