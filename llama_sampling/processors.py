"""Logits processors: small pure functions `(logits, history) -> logits`, composed in a list.

Each factory checks its arguments and returns a `LogitsProcessor`. A processor takes a 1-D
float array of logits over the vocabulary and the token ids seen so far (prompt included), and
returns a new array of the same shape and dtype; it never mutates its input, and may return the
input itself when it has nothing to change. Masked tokens get -inf. Every masking processor
keeps at least the most likely token.

Speed: vocabularies are 32k-262k tokens, so no processor sorts the whole vocabulary when it can
avoid it. `top_k` finds its k tokens with a bucket-max prefilter plus `np.argpartition` on the
few survivors; `top_p`, `typical_p` and `min_p` work on the finite entries only, which after
`top_k` are just k of them, and on a whole vocabulary `top_p` and `typical_p` bucket the tokens
by key and sort only the one bucket where the mass is reached. Logits must not hold NaN.

References: HF `transformers` logits warpers (`TopPLogitsWarper`, `TypicalLogitsWarper`),
llama.cpp `llama-sampling.cpp` (repetition penalty, min-p), the OpenAI API (frequency and
presence penalties), Meister et al. 2022, "Locally Typical Sampling".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from llama_engine.errors import InvalidParamsError, InvalidTokenError
from llama_engine.params import SamplingParams
from llama_sampling._ops import finite, keep_only, logsumexp, prefix_by_key, top_k_indices

__all__ = [
    "LogitsProcessor",
    "build_processors",
    "frequency_presence_penalty",
    "logit_bias",
    "min_p",
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
]

LogitsProcessor = Callable[[np.ndarray, Sequence[int]], np.ndarray]
"""(logits [V], history token ids) -> new logits [V]; never mutates its input."""


# --- penalties and bias -------------------------------------------------------------------------


def logit_bias(bias: Mapping[int, float]) -> LogitsProcessor:
    """Add `bias[token_id]` to each named token's logit (OpenAI `logit_bias`)."""
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    vals = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
    if ids.size and ids.min() < 0:
        raise InvalidParamsError(f"logit_bias keys must be non-negative token ids, got {bias}")
    max_id = int(ids.max()) if ids.size else -1

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if not ids.size:
            return logits
        if max_id >= logits.shape[-1]:
            raise InvalidTokenError(
                f"logit_bias names token id {max_id} but the vocabulary has "
                f"{logits.shape[-1]} tokens; use ids below {logits.shape[-1]}")
        out = logits.copy()
        out[ids] += vals.astype(out.dtype)
        return out

    return apply


def repetition_penalty(penalty: float, window: int = 0) -> LogitsProcessor:
    """Penalise tokens seen in the last `window` history tokens (0 = all), HF/llama.cpp style.

    A seen token's logit is divided by `penalty` when positive and multiplied by it otherwise,
    so `penalty > 1` discourages repeats and `penalty < 1` encourages them.
    """
    _check_positive("repetition_penalty", penalty)
    _check_window(window)
    p = float(penalty)

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if p == 1.0:
            return logits
        seen = np.unique(_recent(history, window, logits.shape[-1]))
        if not seen.size:
            return logits
        out = logits.copy()
        vals = out[seen]
        out[seen] = np.where(vals > 0, vals / p, vals * p)
        return out

    return apply


def frequency_presence_penalty(
    frequency: float, presence: float, window: int = 0
) -> LogitsProcessor:
    """OpenAI penalties over the last `window` history tokens (0 = all).

    `logit -= frequency * count + presence * (count > 0)`, count being the token's occurrences.
    """
    for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise InvalidParamsError(f"{name} must be a finite number, got {value!r}")
    _check_window(window)
    freq, pres = float(frequency), float(presence)

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if freq == 0.0 and pres == 0.0:
            return logits
        seen, counts = np.unique(_recent(history, window, logits.shape[-1]), return_counts=True)
        if not seen.size:
            return logits
        out = logits.copy()
        out[seen] -= (freq * counts + pres).astype(out.dtype)
        return out

    return apply


# --- temperature and truncation -----------------------------------------------------------------


def temperature(t: float) -> LogitsProcessor:
    """Divide the logits by `t` (> 0); greedy decoding (t = 0) is the sampler's job, not this."""
    _check_positive("temperature", t)

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        return logits if t == 1.0 else logits / logits.dtype.type(t)

    return apply


def top_k(k: int) -> LogitsProcessor:
    """Keep exactly the `k` largest logits (ties broken arbitrarily but deterministically)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParamsError(f"top_k must be an integer >= 1, got {k!r}; omit it to disable")

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if k >= logits.shape[-1]:
            return logits
        return keep_only(logits, top_k_indices(logits, k))

    return apply


def top_p(p: float) -> LogitsProcessor:
    """Nucleus sampling: keep the smallest most-likely set whose probability reaches `p`."""
    _check_unit("top_p", p)

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if p >= 1.0:
            return logits
        ids, vals = finite(logits)
        if vals.size <= 1:
            return logits
        neg_logp = logsumexp(vals) - vals  # float32: numpy's float64 exp is several times slower
        # rank by max - logit, not by -log p: subtracting the log-sum-exp can round two
        # different logits to one key and then keep the smaller of the two
        keep = prefix_by_key(vals.max() - vals, np.exp(-neg_logp), p)
        return keep_only(logits, keep if ids is None else ids[keep])

    return apply


def typical_p(p: float) -> LogitsProcessor:
    """Locally typical sampling (HF `TypicalLogitsWarper`).

    Tokens are ranked by |-log p(token) - entropy| and kept in that order until their mass
    reaches `p` (ties with the last kept token are kept too); at least one token is kept.
    """
    _check_unit("typical_p", p)

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if p >= 1.0:
            return logits
        ids, vals = finite(logits)
        if vals.size <= 1:
            return logits
        logp = vals - logsumexp(vals)
        probs = np.exp(logp)
        entropy = -float(np.dot(probs, logp))
        surprise = np.abs(-logp - entropy)
        keep = np.flatnonzero(surprise <= surprise[prefix_by_key(surprise, probs, p)].max())
        return keep_only(logits, keep if ids is None else ids[keep])

    return apply


def min_p(p: float) -> LogitsProcessor:
    """Drop tokens whose probability is below `p` times the most likely token's (llama.cpp)."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise InvalidParamsError(f"min_p must be in [0, 1), got {p!r}")

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if p == 0.0:
            return logits
        # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p); no softmax needed.
        threshold = logits.max() + math.log(p)
        return keep_only(logits, np.flatnonzero(logits >= threshold))

    return apply


# --- composition --------------------------------------------------------------------------------


def build_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors `params` asks for, in `SamplingParams`' documented order.

    Order: logit bias, repetition penalty, frequency/presence penalties, temperature, top-k,
    typical-p, top-p, min-p; disabled ones are left out. For greedy requests
    (temperature 0) only the bias and penalties are built: the sampler then takes the argmax.
    """
    procs: list[LogitsProcessor] = []
    if params.logit_bias:
        procs.append(logit_bias(params.logit_bias))
    if params.repetition_penalty != 1.0:
        procs.append(repetition_penalty(params.repetition_penalty, params.penalty_window))
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        procs.append(frequency_presence_penalty(
            params.frequency_penalty, params.presence_penalty, params.penalty_window))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(temperature(params.temperature))
    if params.top_k > 0:
        procs.append(top_k(params.top_k))
    if params.typical_p < 1.0:
        procs.append(typical_p(params.typical_p))
    if params.top_p < 1.0:
        procs.append(top_p(params.top_p))
    if params.min_p > 0.0:
        procs.append(min_p(params.min_p))
    return procs


# --- argument checks -------------------------------------------------------------------------


def _recent(history: Sequence[int], window: int, vocab: int) -> np.ndarray:
    """The last `window` history ids (all when 0) as int64, checked against the vocabulary."""
    if window and len(history) > window:
        history = history[len(history) - window:]
    ids = np.asarray(history, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
        raise InvalidTokenError(
            f"history holds token id {bad}, outside the vocabulary of {vocab} tokens; "
            "pass the ids the model produced")
    return ids


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParamsError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise InvalidParamsError(f"{name} must be finite, got {value!r}")


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise InvalidParamsError(f"{name} must be in (0, 1], got {value!r}")


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise InvalidParamsError(f"penalty window must be an integer >= 0, got {window!r}")
