"""`Sampler`: greedy, seeded draws, support of the truncations, logprobs, errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llama_engine import InvalidTokenError, SamplingParams
from llama_sampling import SampledToken, Sampler, build_processors
from llama_sampling.sampler import draw

logits_st = arrays(np.float32, st.integers(2, 80), elements=st.floats(-15, 15, width=32))
PLAIN = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}  # no truncation at all


def rows(seed: int, n: int, vocab: int = 1000, scale: float = 2.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(vocab) * scale).astype(np.float32) for _ in range(n)]


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


# --- greedy -------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(x=logits_st)
def test_greedy_is_argmax(x: np.ndarray) -> None:
    assert Sampler(SamplingParams(temperature=0.0)).sample(x, []).token_id == int(np.argmax(x))


@settings(max_examples=50, deadline=None)
@given(x=logits_st, history=st.lists(st.integers(0, 1), max_size=5))
def test_greedy_with_bias_and_penalties_is_argmax_of_the_built_processors(
    x: np.ndarray, history: list[int]
) -> None:
    params = SamplingParams(temperature=0.0, logit_bias={1: 3.0}, repetition_penalty=1.5,
                            presence_penalty=0.5)
    y = x
    for proc in build_processors(params):
        y = proc(y, history)
    assert Sampler(params).sample(x, history).token_id == int(np.argmax(y))


def test_greedy_draws_no_random_numbers() -> None:
    s = Sampler(SamplingParams(temperature=0.0, seed=1))
    state = s.rng.bit_generator.state
    s.sample(np.array([0.0, 1.0], np.float32))
    assert s.rng.bit_generator.state == state


# --- seeds --------------------------------------------------------------------------------------


def test_same_seed_gives_same_tokens() -> None:
    seq = rows(0, 200)
    for kwargs in ({}, PLAIN, {"top_k": 0}, {"typical_p": 0.8, "temperature": 1.3}):
        a = Sampler(SamplingParams(seed=1234, **kwargs))
        b = Sampler(SamplingParams(seed=1234, **kwargs))
        assert [a.sample(x).token_id for x in seq] == [b.sample(x).token_id for x in seq]


def test_different_seeds_give_different_tokens() -> None:
    seq = rows(1, 200, scale=0.5)  # flat: many plausible tokens each step
    a = [Sampler(SamplingParams(seed=1, **PLAIN)).sample(x).token_id for x in seq]
    b = [Sampler(SamplingParams(seed=2, **PLAIN)).sample(x).token_id for x in seq]
    assert sum(i != j for i, j in zip(a, b, strict=True)) > 150
    c = Sampler(SamplingParams(seed=None, **PLAIN))
    d = Sampler(SamplingParams(seed=None, **PLAIN))
    assert [c.sample(x).token_id for x in seq] != [d.sample(x).token_id for x in seq]


def test_samplers_share_no_state() -> None:
    seq = rows(2, 50)
    single = Sampler(SamplingParams(seed=7))
    alone = [single.sample(x).token_id for x in seq]
    s, other = Sampler(SamplingParams(seed=7)), Sampler(SamplingParams(seed=7))
    interleaved = []
    for x in seq:
        other.sample(x)
        interleaved.append(s.sample(x).token_id)
    assert interleaved == alone


# --- the draw itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [3, 1000, 49_152])
def test_draw_frequencies_follow_softmax_sparse(vocab: int) -> None:
    ids = np.array([0, vocab // 2, vocab - 1])  # in different blocks of the two-level CDF
    probs = np.array([0.5, 0.3, 0.2])
    x = np.full(vocab, -np.inf, np.float32)
    x[ids] = np.log(probs)
    if vocab > 3:
        x[1] = math.log(1e-9)  # a live but negligible token
    rng = np.random.default_rng(0)
    got = np.array([draw(x, rng) for _ in range(10_000)])
    assert set(np.unique(got).tolist()) <= {*ids.tolist(), 1}
    np.testing.assert_allclose([(got == i).mean() for i in ids], probs, atol=0.02)


def test_draw_frequencies_follow_softmax_dense() -> None:
    x = np.random.default_rng(5).standard_normal(2000).astype(np.float32)
    groups = np.arange(x.size) // 200  # 10 groups of 200 tokens, across blocks
    expected = np.bincount(groups, weights=np.exp(log_softmax64(x)))
    rng = np.random.default_rng(1)
    got = np.array([draw(x, rng) for _ in range(10_000)])
    np.testing.assert_allclose(np.bincount(groups[got], minlength=10) / got.size, expected,
                               atol=0.015)


@settings(max_examples=100, deadline=None)
@given(x=logits_st, mask=arrays(np.bool_, 80), seed=st.integers(0, 2**32 - 1))
def test_draw_never_picks_a_masked_token(x: np.ndarray, mask: np.ndarray, seed: int) -> None:
    m = mask[: x.size].copy()
    m[int(np.argmax(x))] = False
    y = np.where(m, np.float32(-np.inf), x)
    tok = draw(y, np.random.default_rng(seed))
    assert np.isfinite(y[tok])


# --- support of the whole chain -----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    x=logits_st,
    t=st.floats(0.2, 3.0),
    k=st.integers(0, 10),
    p=st.floats(0.05, 1.0),
    mp=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampled_token_is_in_the_top_k_top_p_min_p_support(
    x: np.ndarray, t: float, k: int, p: float, mp: float, seed: int
) -> None:
    params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, seed=seed)
    tok = Sampler(params).sample(x, []).token_id
    scaled = x.astype(np.float64) / t
    # top-k runs after the temperature (HF's order), on float32 logits: dividing can tie a
    # tiny logit with zero, so the k largest are those of the divided logits
    tempered = x / np.float32(t)
    in_k = np.ones(x.size, bool) if k == 0 or k >= x.size else tempered >= np.sort(tempered)[-k]
    assert in_k[tok]
    # top-p acts on the top-k survivors, renormalised
    probs = np.where(in_k, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    assert probs[probs > probs[tok] * (1 + 1e-5)].sum() < p + 1e-4
    # min-p: relative to the best token, which both truncations keep
    assert scaled[tok] - scaled.max() >= math.log(mp) - 1e-4 if mp > 0 else True


@settings(max_examples=50, deadline=None)
@given(x=logits_st, seed=st.integers(0, 2**32 - 1))
def test_sample_never_mutates_and_never_nans(x: np.ndarray, seed: int) -> None:
    before = x.copy()
    params = SamplingParams(seed=seed, repetition_penalty=1.2, frequency_penalty=0.3,
                            typical_p=0.9, logprobs=3)
    out = Sampler(params).sample(x, [0, 1, 1])
    np.testing.assert_array_equal(x, before)
    assert 0 <= out.token_id < x.size
    assert out.logprob is not None and not math.isnan(out.logprob)


def test_logit_bias_plus_100_forces_a_token() -> None:
    s = Sampler(SamplingParams(logit_bias={7: 100.0}, seed=0))
    assert {s.sample(x).token_id for x in rows(3, 100, scale=5.0)} == {7}
    g = Sampler(SamplingParams(logit_bias={7: 100.0}, temperature=0.0))
    assert g.sample(rows(4, 1)[0]).token_id == 7


def test_logit_bias_minus_100_bans_a_token() -> None:
    x = np.zeros(4, np.float32)
    x[2] = 10.0
    s = Sampler(SamplingParams(logit_bias={2: -100.0}, seed=0, **PLAIN))
    assert 2 not in {s.sample(x).token_id for _ in range(300)}


def test_penalties_steer_away_from_repeats() -> None:
    x = np.array([3.0, 2.9, 0.0, 0.0], np.float32)
    history = [0, 0, 0]
    assert Sampler(SamplingParams(temperature=0.0)).sample(x, history).token_id == 0
    for kw in ({"repetition_penalty": 1.3}, {"frequency_penalty": 0.1},
               {"presence_penalty": 0.5}):
        params = SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]
        assert Sampler(params).sample(x, history).token_id == 1, kw
    # outside the window, a repeat is not penalised
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, penalty_window=2)
    assert Sampler(params).sample(x, [0, 2, 3]).token_id == 0


# --- logprobs -----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(x=logits_st, n=st.integers(0, 20), seed=st.integers(0, 2**32 - 1))
def test_logprobs_are_the_raw_log_softmax(x: np.ndarray, n: int, seed: int) -> None:
    params = SamplingParams(logprobs=n, seed=seed, temperature=0.5, logit_bias={0: 5.0})
    out = Sampler(params).sample(x, [])
    ref = log_softmax64(x)
    assert out.logprob == pytest.approx(ref[out.token_id], abs=1e-4)
    assert out.top_logprobs is not None
    assert len(out.top_logprobs) == min(n, x.size)
    assert sum(math.exp(v) for v in out.top_logprobs.values()) <= 1 + 1e-5
    values = list(out.top_logprobs.values())
    assert values == sorted(values, reverse=True)
    for tok, lp in out.top_logprobs.items():
        assert lp == pytest.approx(ref[tok], abs=1e-4)
    if n:
        assert min(values) >= np.sort(ref)[-min(n, x.size)] - 1e-4


def test_logprobs_describe_the_model_not_the_bias() -> None:
    x = np.log(np.array([0.7, 0.2, 0.1])).astype(np.float32)
    out = Sampler(SamplingParams(logprobs=2, logit_bias={2: 100.0}, seed=0)).sample(x)
    assert out.token_id == 2
    assert out.logprob == pytest.approx(math.log(0.1), abs=1e-5)
    assert list(out.top_logprobs or {}) == [0, 1]


def test_logprobs_off_and_zero() -> None:
    x = np.array([0.0, 1.0], np.float32)
    off = Sampler(SamplingParams(seed=0)).sample(x)
    assert off.logprob is None and off.top_logprobs is None
    zero = Sampler(SamplingParams(seed=0, logprobs=0, temperature=0.0)).sample(x)
    assert zero.top_logprobs == {}
    assert zero.logprob == pytest.approx(float(log_softmax64(x)[1]))


def test_sampled_token_is_frozen_with_slots() -> None:
    tok = SampledToken(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.token_id = 4  # type: ignore[misc]
    assert not hasattr(tok, "__dict__")


# --- errors and boundaries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "phrase"),
    [
        (np.zeros((2, 3), np.float32), "logits must be 1-D"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        (np.full(3, -np.inf, np.float32), "every logit is -inf"),
    ],
)
def test_bad_logits_raise_value_error(x: np.ndarray, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        Sampler(SamplingParams(seed=0)).sample(x)


def test_history_outside_vocabulary_raises() -> None:
    with pytest.raises(InvalidTokenError, match="outside the vocabulary"):
        Sampler(SamplingParams(repetition_penalty=1.1)).sample(np.zeros(4, np.float32), [4])


def test_other_float_dtypes_are_accepted() -> None:
    x = np.array([0.0, 3.0, 1.0], np.float16)
    assert Sampler(SamplingParams(temperature=0.0)).sample(x).token_id == 1
    assert Sampler(SamplingParams(seed=0)).sample(x.astype(np.float64)).token_id in {0, 1, 2}


def test_importing_llama_sampling_imports_no_torch_or_mlx() -> None:
    code = (
        "import sys, llama_sampling\n"
        "print(','.join(m for m in ('torch', 'mlx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
