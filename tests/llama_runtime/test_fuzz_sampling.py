"""Fuzz: random sampling parameters, valid and hostile, through the real engine. Each ends in a
typed error at submission or a completion, quickly, and the engine keeps serving."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_engine import Completion, InvalidParamsError, LlamaError, SamplingParams

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    st.sampled_from([0.0, 1e-50, 1e-6, 1e-4, 1.0, 2.0, 1e300, -0.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=50),
)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=3))
ids = st.one_of(st.integers(min_value=0, max_value=49151),
                st.integers(min_value=-5, max_value=2**40))
hostile = st.one_of(numbers, junk)
valid = {
    "temperature": st.floats(0, 2),
    "top_k": st.integers(0, 100),
    "top_p": st.floats(0.01, 1),
    "min_p": st.floats(0, 0.99),
    "typical_p": st.floats(0.01, 1),
    "repetition_penalty": st.floats(0.01, 100),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "penalty_window": st.integers(0, 100),
    "logit_bias": st.dictionaries(ids, st.floats(-100, 100), max_size=6),
    "seed": st.integers(0, 2**64),
    "stop": st.one_of(st.lists(st.text(min_size=1, max_size=8), max_size=5),
                      st.text(min_size=1, max_size=4)),
    "stop_token_ids": st.lists(ids, max_size=4),
    "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "max_tokens": st.integers(1, 3),
    "timeout": st.one_of(st.none(), st.floats(0.01, 10)),
}
# each field valid three times in four, else anything at all
params = st.dictionaries(st.sampled_from([*FIELDS, "temprature"]), st.none(), max_size=5).flatmap(
    lambda d: st.fixed_dictionaries({k: st.one_of(
        *[valid.get(k, hostile)] * 3, hostile) for k in d}))


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=params)
def test_random_sampling_parameters_end_typed_or_complete(engine, kwargs) -> None:
    try:
        p = SamplingParams.from_kwargs(**kwargs)
    except InvalidParamsError:
        return
    for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty"):
        assert math.isfinite(getattr(p, name)), name
    p = p.replace(max_tokens=min(p.max_tokens, 3), timeout=None)
    started = time.perf_counter()
    try:
        out = engine.generate("Hello", params=p)
    except LlamaError:
        pass
    else:
        assert isinstance(out, Completion) and out.finish_reason in ("stop", "length")
        assert 1 <= len(out.token_ids) <= 3 or out.finish_reason == "stop"
    assert time.perf_counter() - started < 20


def test_the_engine_serves_after_the_fuzz(engine) -> None:
    assert engine.generate("Hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
    assert engine.stats()["kv_blocks_used"] == 0
