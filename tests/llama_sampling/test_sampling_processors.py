"""Each logits processor on hand-made logits, and its invariants on random ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llama_engine import InvalidParamsError, InvalidTokenError, SamplingParams
from llama_sampling import (
    build_processors,
    frequency_presence_penalty,
    logit_bias,
    min_p,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
    typical_p,
)

NEG_INF = -np.inf
# probabilities 0.5, 0.3, 0.15, 0.05
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)

small_logits = arrays(
    np.float32, st.integers(1, 64), elements=st.floats(-20, 20, width=32)
)


@st.composite
def masked_logits(draw: st.DrawFn) -> np.ndarray:
    """Small logits where some entries are already -inf (at least one is finite)."""
    x = draw(small_logits)
    mask = draw(arrays(np.bool_, x.shape))
    mask[int(np.argmax(x))] = False
    return np.where(mask, np.float32(NEG_INF), x)


@st.composite
def big_logits(draw: st.DrawFn) -> np.ndarray:
    """A vocabulary-sized row (numpy-generated from a drawn seed, so hypothesis stays fast)."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.3, 8.0))
    size = draw(st.sampled_from([5000, 20_000, 49_152]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(size) * scale).astype(np.float32)
    if draw(st.booleans()):  # an earlier processor masked part of it, leaving > 4096 live
        x[rng.random(size) < 0.2] = NEG_INF
    return x


def finite_ids(x: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(x))}


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# --- hand-made values ---------------------------------------------------------------------------


def test_logit_bias_adds_to_named_tokens_only() -> None:
    x = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    out = logit_bias({0: 5.0, 2: -1.0})(x, [])
    np.testing.assert_allclose(out, [5.0, 1.0, 1.0])
    np.testing.assert_array_equal(x, [0.0, 1.0, 2.0])  # input untouched
    assert out.dtype == np.float32


def test_logit_bias_outside_vocabulary_is_a_typed_error() -> None:
    with pytest.raises(InvalidTokenError, match="vocabulary has 3 tokens"):
        logit_bias({7: 1.0})(np.zeros(3, np.float32), [])


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    x = np.array([2.0, -2.0, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(repetition_penalty(2.0)(x, [0, 1, 1]), [1.0, -4.0, 1.0, 3.0])
    # window=1: only the last token (1) counts
    np.testing.assert_allclose(repetition_penalty(2.0, 1)(x, [0, 1]), [2.0, -4.0, 1.0, 3.0])
    # a penalty below 1 encourages repeats
    np.testing.assert_allclose(repetition_penalty(0.5)(x, [0]), [4.0, -2.0, 1.0, 3.0])
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, 3.0])


def test_frequency_presence_penalty_follows_openai() -> None:
    x = np.zeros(4, dtype=np.float32)
    out = frequency_presence_penalty(0.5, 1.0)(x, [1, 1, 2])
    np.testing.assert_allclose(out, [0.0, -2.0, -1.5, 0.0])  # 0.5*2+1, 0.5*1+1
    out = frequency_presence_penalty(0.5, 1.0, 2)(x, [1, 1, 2])  # window: [1, 2]
    np.testing.assert_allclose(out, [0.0, -1.5, -1.5, 0.0])
    out = frequency_presence_penalty(-1.0, 0.0)(x, [3])  # negative: encourage
    np.testing.assert_allclose(out, [0.0, 0.0, 0.0, 1.0])
    assert not x.any()


def test_penalties_reject_history_outside_vocabulary() -> None:
    with pytest.raises(InvalidTokenError, match="outside the vocabulary of 4"):
        repetition_penalty(1.3)(np.zeros(4, np.float32), [0, 9])


def test_penalties_with_empty_history_change_nothing() -> None:
    x = np.array([1.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(repetition_penalty(1.5)(x, []), x)
    np.testing.assert_array_equal(frequency_presence_penalty(1.0, 1.0)(x, []), x)


def test_temperature_scales() -> None:
    x = np.array([2.0, 4.0, NEG_INF], dtype=np.float32)
    np.testing.assert_allclose(temperature(2.0)(x, []), [1.0, 2.0, NEG_INF])
    np.testing.assert_allclose(temperature(0.5)(x, []), [4.0, 8.0, NEG_INF])


def test_top_k_keeps_the_k_largest() -> None:
    x = np.array([1.0, 5.0, 3.0, 4.0], dtype=np.float32)
    np.testing.assert_array_equal(top_k(2)(x, []), [NEG_INF, 5.0, NEG_INF, 4.0])
    np.testing.assert_array_equal(top_k(1)(x, []), [NEG_INF, 5.0, NEG_INF, NEG_INF])
    np.testing.assert_array_equal(top_k(4)(x, []), x)
    np.testing.assert_array_equal(top_k(10)(x, []), x)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert finite_ids(top_p(0.4)(LOGITS, [])) == {0}
    assert finite_ids(top_p(0.7)(LOGITS, [])) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert finite_ids(top_p(0.85)(LOGITS, [])) == {0, 1, 2}
    assert finite_ids(top_p(0.99)(LOGITS, [])) == {0, 1, 2, 3}
    kept = top_p(0.7)(LOGITS, [])
    np.testing.assert_array_equal(kept[:2], LOGITS[:2])  # kept values are unchanged


def test_top_p_on_uniform_logits_keeps_just_enough() -> None:
    assert len(finite_ids(top_p(0.5)(np.zeros(5, np.float32), []))) == 3


def test_min_p_is_relative_to_the_best_token() -> None:
    assert finite_ids(min_p(0.2)(LOGITS, [])) == {0, 1, 2}  # threshold 0.1
    assert finite_ids(min_p(0.5)(LOGITS, [])) == {0, 1}  # threshold 0.25
    assert finite_ids(min_p(0.99)(LOGITS, [])) == {0}
    np.testing.assert_array_equal(min_p(0.0)(LOGITS, []), LOGITS)


def test_typical_p_ranks_by_distance_from_entropy() -> None:
    # entropy 1.142 nats; |-log p - H| = .449, .062, .755, 1.854, so token 1 is the most typical
    assert finite_ids(typical_p(0.2)(LOGITS, [])) == {1}  # not the most likely token
    assert finite_ids(typical_p(0.5)(LOGITS, [])) == {0, 1}
    assert finite_ids(typical_p(0.9)(LOGITS, [])) == {0, 1, 2}
    np.testing.assert_array_equal(typical_p(1.0)(LOGITS, []), LOGITS)


def test_typical_p_matches_hf_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = (rng.standard_normal(50) * 2).astype(np.float32)
        mass = float(rng.uniform(0.1, 0.95))
        assert finite_ids(typical_p(mass)(x, [])) == _hf_typical(x, mass)


def _hf_typical(x: np.ndarray, mass: float) -> set[int]:
    """A transcription of HF `TypicalLogitsWarper` (min_tokens_to_keep=1) in float64."""
    logp = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
    p = np.exp(logp)
    shifted = np.abs(-logp - (-(logp * p).sum()))
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(p[order])
    last = min(int((cum < mass).sum()), x.size - 1)
    remove = shifted[order] > shifted[order][last]
    remove[0] = False
    return {int(i) for i in order[~remove]}


@pytest.mark.parametrize(
    ("factory", "bad", "phrase"),
    [
        (temperature, 0.0, "temperature must be a number > 0"),
        (top_k, 0, "top_k must be an integer >= 1"),
        (top_p, 0.0, "top_p must be in (0, 1]"),
        (typical_p, 1.5, "typical_p must be in (0, 1]"),
        (min_p, 1.0, "min_p must be in [0, 1)"),
        (repetition_penalty, -1.0, "repetition_penalty must be a number > 0"),
    ],
)
def test_factories_reject_bad_arguments(factory: object, bad: float, phrase: str) -> None:
    with pytest.raises(InvalidParamsError) as e:
        factory(bad)  # type: ignore[operator]
    assert phrase in str(e.value)


# --- build_processors ---------------------------------------------------------------------------


def _names(params: SamplingParams) -> list[str]:
    return [p.__qualname__.split(".")[0] for p in build_processors(params)]


def test_build_processors_follows_the_documented_order() -> None:
    params = SamplingParams(
        logit_bias={1: 2.0}, repetition_penalty=1.1, frequency_penalty=0.1,
        presence_penalty=0.1, temperature=0.7, top_k=10, typical_p=0.9, top_p=0.9, min_p=0.1,
    )
    assert _names(params) == [
        "logit_bias", "repetition_penalty", "frequency_presence_penalty", "temperature",
        "top_k", "typical_p", "top_p", "min_p",
    ]


def test_build_processors_skips_disabled_ones() -> None:
    assert _names(SamplingParams()) == ["temperature", "top_k", "top_p", "min_p"]
    assert _names(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)) == []
    assert _names(SamplingParams(presence_penalty=0.5))[0] == "frequency_presence_penalty"


def test_greedy_builds_only_bias_and_penalties() -> None:
    params = SamplingParams(temperature=0.0, logit_bias={0: 1.0}, repetition_penalty=1.2)
    assert _names(params) == ["logit_bias", "repetition_penalty"]


# --- invariants on random logits ----------------------------------------------------------------


ALL = [
    logit_bias({0: 3.0}),
    repetition_penalty(1.3),
    frequency_presence_penalty(0.4, 0.6),
    temperature(0.7),
    top_k(3),
    top_p(0.6),
    min_p(0.1),
    typical_p(0.7),
]


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(small_logits, masked_logits()), history=st.lists(st.integers(0, 0), max_size=3))
def test_processors_never_mutate_never_nan_and_keep_a_token(
    x: np.ndarray, history: list[int]
) -> None:
    before = x.copy()
    for proc in ALL:
        out = proc(x, history)
        np.testing.assert_array_equal(x, before)
        assert out.shape == x.shape and out.dtype == np.float32
        assert not np.isnan(out).any()
        assert np.isfinite(out).any()


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(small_logits, masked_logits()), k=st.integers(1, 70))
def test_top_k_support(x: np.ndarray, k: int) -> None:
    out = top_k(k)(x, [])
    kept = np.isfinite(out)
    n_finite = int(np.isfinite(x).sum())
    assert kept.sum() == min(k, n_finite)
    if kept.sum() and (~kept & np.isfinite(x)).any():
        assert x[kept].min() >= x[~kept & np.isfinite(x)].max()
    np.testing.assert_array_equal(out[kept], x[kept])


def _check_nucleus(x: np.ndarray, out: np.ndarray, p: float) -> None:
    """`out` keeps a most-likely prefix of `x` whose mass reaches p, and no more than needed."""
    probs = softmax64(x)
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], x[kept])
    assert x[kept].max() == x.max()
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max() * (1 - 1e-5)
    assert probs[kept].sum() >= p - 1e-4
    assert probs[kept].sum() - probs[kept].min() < p + 1e-4


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(small_logits, masked_logits()), p=st.floats(0.01, 0.999))
@example(x=np.array([0.0, 2.3845928e-31], dtype=np.float32), p=0.5)  # keys that round equal
def test_top_p_support_small(x: np.ndarray, p: float) -> None:
    _check_nucleus(x, top_p(p)(x, []), p)


@settings(max_examples=30, deadline=None)
@given(x=big_logits(), p=st.floats(0.01, 0.999))
def test_top_p_support_on_a_whole_vocabulary(x: np.ndarray, p: float) -> None:
    _check_nucleus(x, top_p(p)(x, []), p)


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(small_logits, masked_logits()), p=st.floats(0.0, 0.999))
def test_min_p_support(x: np.ndarray, p: float) -> None:
    out = min_p(p)(x, [])
    probs = softmax64(x)
    kept = np.isfinite(out)
    assert kept[int(np.argmax(x))]
    assert (probs[kept] >= p * probs.max() * (1 - 1e-5)).all()
    assert (probs[~kept & np.isfinite(x)] < p * probs.max() * (1 + 1e-5)).all()


def _check_typical(x: np.ndarray, out: np.ndarray, mass: float) -> None:
    with np.errstate(divide="ignore"):  # masked tokens: log 0
        logp = np.log(softmax64(x))
    probs = np.exp(logp)
    live = np.isfinite(x)
    entropy = -(probs[live] * logp[live]).sum()
    surprise = np.abs(-logp - entropy)
    kept = np.isfinite(out)
    assert kept.any()
    bound = surprise[kept].max()
    if (~kept & live).any():
        assert bound <= surprise[~kept & live].min() + 1e-4
    assert probs[kept].sum() >= mass - 1e-4 or kept.sum() == live.sum()
    assert probs[kept & (surprise < bound - 1e-4)].sum() < mass + 1e-4


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(small_logits, masked_logits()), mass=st.floats(0.01, 0.999))
def test_typical_p_support_small(x: np.ndarray, mass: float) -> None:
    _check_typical(x, typical_p(mass)(x, []), mass)


@settings(max_examples=20, deadline=None)
@given(x=big_logits(), mass=st.floats(0.05, 0.99))
def test_typical_p_support_on_a_whole_vocabulary(x: np.ndarray, mass: float) -> None:
    _check_typical(x, typical_p(mass)(x, []), mass)


@settings(max_examples=30, deadline=None)
@given(x=big_logits(), k=st.sampled_from([1, 5, 40, 100, 1000, 3000]))
def test_top_k_on_a_whole_vocabulary_matches_a_full_sort(x: np.ndarray, k: int) -> None:
    kept = np.flatnonzero(np.isfinite(top_k(k)(x, [])))
    assert kept.size == k
    kth = np.sort(x)[-k]
    assert x[kept].min() == kth


def test_min_p_threshold_uses_logits_directly() -> None:
    x = np.array([0.0, math.log(0.1) + 1e-4, math.log(0.1) - 1e-4], dtype=np.float32)
    assert finite_ids(min_p(0.1)(x, [])) == {0, 1}
