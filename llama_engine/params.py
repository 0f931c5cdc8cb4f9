"""`SamplingParams`: how one request picks its tokens. Frozen, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llama_engine.errors import InvalidParamsError

__all__ = ["GREEDY_BELOW", "MAX_LOGIT_BIAS", "MAX_STOP_CHARS", "MAX_STOP_STRINGS",
           "MAX_STOP_TOKEN_IDS", "SamplingParams"]

GREEDY_BELOW = 1e-5
"""A temperature below this is greedy: dividing logits by it would overflow float32 (vLLM's
threshold)."""
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1 << 20
"""Bounds on one request's lists, so that no request makes every step of the batch slow. (The
engine also checks ids against the model's vocabulary when the request is submitted.)"""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling options of one request.

    The default values are llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05). The
    processors run in HF's and vLLM's order: logit bias, repetition/frequency/presence
    penalties, temperature, top-k, typical-p, top-p, min-p; then one token is drawn with the
    request's own seeded RNG. (llama.cpp applies temperature last, so with temperature != 1 its
    top-p/min-p cut on untempered probabilities.) Penalties count the last `penalty_window`
    tokens of the whole context, prompt included, as llama.cpp does.
    """

    max_tokens: int = 256
    """Most tokens to generate; must be >= 1."""
    temperature: float = 0.8
    """Softmax temperature, finite and >= 0. 0 (or anything below `GREEDY_BELOW`) means greedy
    (argmax)."""
    top_k: int = 40
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set whose probability reaches top_p; in (0, 1]."""
    min_p: float = 0.05
    """Drop tokens whose probability is below min_p times the best one's; in [0, 1)."""
    typical_p: float = 1.0
    """Locally typical sampling mass; in (0, 1], 1 disables."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens seen in the window; in [0.01, 100]
    (beyond, logits overflow), 1 disables."""
    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the window; in [-2, 2]."""
    presence_penalty: float = 0.0
    """Subtract this from every token present in the window; in [-2, 2]."""
    penalty_window: int = 64
    """How many of the last tokens (prompt included) the penalties look at; 0 = all."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Added to the named token ids' logits before anything else; values in [-100, 100]."""
    seed: int | None = None
    """Seed of the request's RNG: the same seed gives the same tokens. None = fresh entropy."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the stop string itself is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's end-of-generation tokens."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-generation tokens (benchmarks)."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many top alternatives (0..20); None = off."""
    timeout: float | None = None
    """Seconds from submission after which the request is cancelled (finish reason
    "cancelled", KV freed); None = no limit."""
    response_format: Any = None
    """Constrain the output (llama_sampling.constraint): {"type": "json_schema", "json_schema":
    {"schema": {...}}}, {"type": "json_object"}, {"type": "regex", "pattern": ...}, {"type":
    "choice", "choices": [...]}, {"type": "grammar", "lark": ...}, or a pydantic model class.
    Compiled against the model's vocabulary when the request is submitted (a bad schema, regex
    or grammar is an InvalidParamsError then); a reply cut by max_tokens ends "length" with
    what was written. None = free text."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, MAX_STOP_STRINGS,
                                                   single=str))
        object.__setattr__(self, "stop_token_ids", _as_tuple(
            "stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS, single=int))
        fmt = self.response_format
        if fmt is not None and not isinstance(fmt, Mapping) and not (
                isinstance(fmt, type) and hasattr(fmt, "model_json_schema")):
            raise InvalidParamsError(
                "response_format must be a dict such as {'type': 'json_schema', 'json_schema': "
                "{'schema': {...}}} or a pydantic model class, got "
                f"{type(fmt).__name__}")
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidParamsError(
                "logit_bias must be a mapping of token id -> bias, got "
                f"{type(self.logit_bias).__name__}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParamsError(
                f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are "
                "allowed")
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature, lo=0.0, hi=None, allowed=">= 0")
        _check_int("top_k", self.top_k, lo=0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, allowed="in (0, 1]")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0, hi_open=True, allowed="in [0, 1)")
        _check_float(
            "typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True, allowed="in (0, 1]"
        )
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.01, hi=100.0,
                     allowed="in [0.01, 100]")
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0,
                     allowed="in [-2, 2]")
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0,
                     allowed="in [-2, 2]")
        _check_int("penalty_window", self.penalty_window, lo=0)
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise InvalidParamsError(
                    f"logit_bias keys must be non-negative token ids, got {tok!r}")
            _check_float(f"logit_bias[{tok}]", bias, lo=-100.0, hi=100.0,
                         allowed="in [-100, 100]")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParamsError(f"stop must hold non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidParamsError(
                    f"a stop string is {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, lo=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=20)
        if self.timeout is not None:
            _check_float("timeout", self.timeout, lo=0.0, hi=None, lo_open=True, allowed="> 0")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one too small to divide logits by."""
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, naming any unknown one (rather than a bare TypeError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidParamsError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated like a new one)."""
        return SamplingParams.from_kwargs(**{**dataclasses.asdict(self), **changes})


def _as_tuple(name: str, value: Any, limit: int, *, single: type) -> tuple[Any, ...]:
    """`value` as a tuple (a lone `single` becomes a 1-tuple), at most `limit` long."""
    if isinstance(value, single) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise InvalidParamsError(
            f"{name} must be a list of {single.__name__}, got {type(value).__name__}")
    items: list[Any] = []
    for item in value:
        items.append(item)
        if len(items) > limit:
            raise InvalidParamsError(f"{name} holds more than {limit} entries; pass at most "
                                     f"{limit}")
    return tuple(items)


def _check_int(name: str, value: Any, *, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidParamsError(f"{name} must be {rng}, got {value}")


def _check_float(
    name: str,
    value: Any,
    *,
    lo: float,
    hi: float | None,
    allowed: str,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParamsError(f"{name} must be a number {allowed}, got {value!r}")
    v = float(value)
    bad = (
        not math.isfinite(v)
        or (v <= lo if lo_open else v < lo)
        or (hi is not None and (v >= hi if hi_open else v > hi))
    )
    if bad:
        finite = "" if math.isfinite(v) else "a finite number "
        raise InvalidParamsError(f"{name} must be {finite}{allowed}, got {value}")


