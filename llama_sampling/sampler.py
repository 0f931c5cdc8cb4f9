"""`Sampler`: picks one token per decode step for one request, from numpy logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama_engine.params import SamplingParams
from llama_sampling._ops import finite, logsumexp, top_k_indices
from llama_sampling.processors import LogitsProcessor, build_processors

__all__ = ["SampledToken", "Sampler", "draw"]

_BLOCK = 256  # tokens per block of `draw`'s two-level CDF


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One sampled token, with logprobs when the request asked for them."""

    token_id: int
    logprob: float | None = None
    """Log-probability of `token_id` under the raw model logits; None unless logprobs is set."""
    top_logprobs: dict[int, float] | None = None
    """The `params.logprobs` most likely token ids -> raw logprob, most likely first ({} for 0)."""


class Sampler:
    """Turns one request's logits into tokens, step after step.

    Built per request from its `SamplingParams`: the processor list is built once, and the
    request owns a `numpy.random.Generator` seeded from `params.seed` (None = fresh entropy), so
    the same seed and the same logits sequence give the same tokens. Each non-greedy step draws
    exactly one uniform number; greedy steps draw none. No global state: rows of a batch each
    get their own `Sampler`.

    Logprobs are the log-softmax of the RAW model logits, before bias, penalties, temperature or
    truncation, as OpenAI and vLLM report them: they describe the model, not the sampler.
    """

    __slots__ = ("params", "processors", "rng")

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.processors: list[LogitsProcessor] = build_processors(params)
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> SampledToken:
        """Pick the next token from `logits` [V] (float32 preferred) given the ids so far."""
        raw = np.asarray(logits, dtype=np.float32)
        if raw.ndim != 1:
            raise ValueError(f"logits must be 1-D [vocab], got shape {raw.shape}; pass one row")
        mx = float(raw.max())
        if math.isnan(mx) or mx == math.inf:
            raise ValueError("logits hold NaN or +inf; the model's forward pass overflowed "
                             "(try a wider dtype)")
        if mx == -math.inf:
            raise ValueError("every logit is -inf; no token can be sampled")
        x = raw
        for proc in self.processors:
            x = proc(x, history)
        if self.params.greedy:
            token = int(np.argmax(x))
            if not x[token] > -math.inf:
                raise ValueError("every logit is -inf after bias and penalties")
        else:
            token = draw(x, self.rng)
        n = self.params.logprobs
        if n is None:
            return SampledToken(token)
        lse = logsumexp(raw)
        return SampledToken(token, float(raw[token]) - lse, _top_logprobs(raw, n, lse))


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw a token id from softmax(`logits`) with one `rng.random()`; -inf entries never win.

    Inverse-CDF sampling. A running sum over a whole vocabulary is slow in numpy, so the CDF is
    two-level: sums of blocks of `_BLOCK` tokens first, then a running sum inside one block.
    """
    ids, vals = finite(logits)
    if not vals.size:
        raise ValueError("every logit is -inf after processing; no token can be sampled")
    probs = np.exp(vals - vals.max())  # float32: numpy's float64 exp is several times slower
    block_mass = np.add.reduceat(probs, np.arange(0, probs.size, _BLOCK), dtype=np.float64)
    cum = np.cumsum(block_mass)
    u = rng.random() * cum[-1]
    b = min(int(np.searchsorted(cum, u, side="right")), cum.size - 1)
    block = probs[b * _BLOCK: (b + 1) * _BLOCK]
    j = int(np.searchsorted(np.cumsum(block, dtype=np.float64), u - (cum[b - 1] if b else 0.0),
                            side="right"))
    if j >= block.size or block[j] == 0.0:  # rounding at a block's top: take its last live token
        b = int(np.flatnonzero(block_mass)[-1]) if block_mass[b] == 0.0 else b
        block = probs[b * _BLOCK: (b + 1) * _BLOCK]
        j = int(np.flatnonzero(block)[-1])
    pos = b * _BLOCK + j
    return pos if ids is None else int(ids[pos])


def _top_logprobs(raw: np.ndarray, n: int, lse: float) -> dict[int, float]:
    if n <= 0:
        return {}
    idx = top_k_indices(raw, n) if n < raw.size else np.arange(raw.size)
    idx = idx[np.argsort(-raw[idx], kind="stable")]
    return {int(i): float(raw[i]) - lse for i in idx}
