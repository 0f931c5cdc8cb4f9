"""One request's token-by-token state: sampling, detokenization, stop checks and usage.

Backend-neutral: it receives each step's logits (numpy) and returns the chunk to emit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from llama_engine import FinishReason, SamplingParams, StreamChunk, Usage
from llama_sampling import Sampler, StopChecker
from llama_sampling.constraint import Constraint, Grammar, closing_margin
from llama_sampling.sampler import SampledToken
from llama_tokenizer import Tokenizer

__all__ = ["GUESSES", "Generation"]

GUESSES = 4
"""Greedy constrained decoding tries the model's best this many tokens against the grammar
before making the token mask (a mask costs ~10-250 us on a 49k vocabulary, a try ~1 us plus a
re-sample); sampled decoding tries the one token it drew."""


class Generation:
    """Turns successive logits into chunks until a finish condition holds."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, history: Sequence[int],
                 *, usage: Usage, started_at: float, context_length: int,
                 grammar: Grammar | None = None) -> None:
        """`grammar`: params.response_format compiled for this tokenizer (at submission)."""
        self.params = params
        # Without logprobs, the model's own choice is taken when the grammar allows it, and a
        # mask is made only when it does not (see `_guess`).
        guess = params.logprobs is None
        self.constraint = None if grammar is None else grammar.constraint(guess_first=guess)
        self.guesses = GUESSES if params.temperature == 0 else 1
        self.closing_margin = closing_margin(params.max_tokens)
        self.sampler = Sampler(params)
        self.detok = tokenizer.stream_decoder(skip_special=True, continuation=True)
        self.stop = StopChecker(params.stop)
        self.end_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(tokenizer.eog_ids))
        self.history = list(history)
        self.usage = usage
        self.started_at = started_at
        self.context_length = context_length
        self.t_first = 0.0
        self.n = 0

    def step(self, logits: np.ndarray) -> tuple[StreamChunk, bool]:
        """Sample the next token; returns its chunk and whether generation is over (if not,
        the caller feeds `chunk.token_id` to the model)."""
        s = None
        if (c := self.constraint) is not None:
            left = min(self.params.max_tokens - self.n,
                       self.context_length - len(self.history) - 1)
            closing = c.closes and left <= self.closing_margin
            if c.guessing:
                s = self._guess(logits, c, closing)
            if s is None:  # tokens the grammar does not allow next: -inf
                logits = np.array(logits, dtype=np.float32)
                c.mask(logits, closing=closing)
        if s is None:
            s = self.sampler.sample(logits, self.history)
        self.n += 1
        now = time.perf_counter()
        if self.n == 1:
            self.t_first = now
            self.usage.ttft_ms = (now - self.started_at) * 1e3
        tid = s.token_id
        self.history.append(tid)
        finish: FinishReason | None = None
        if tid in self.end_ids:
            finish, text = "stop", ""
        else:
            if self.constraint is not None:
                self.constraint.advance(tid)
            text, hit = self.stop.push(self.detok.push(tid))
            if hit or (self.constraint is not None and self.constraint.finished):
                finish = "stop"
        if finish is None and (self.n >= self.params.max_tokens
                               or len(self.history) + 1 >= self.context_length):
            finish = "length"
        if finish == "stop" and self.constraint is not None and self.constraint.closed_early:
            finish = "length"  # complete, but only because the budget closed it
        chunk = StreamChunk(text=text, token_id=tid, logprob=s.logprob,
                            top_logprobs=s.top_logprobs)
        if finish is not None:
            if not self.stop.stopped:
                tail, _ = self.stop.push(self.detok.flush())
                chunk.text += tail + self.stop.flush()
            self._close(chunk, finish)
        return chunk, finish is not None

    def _guess(self, logits: np.ndarray, c: Constraint, closing: bool) -> SampledToken | None:
        """A token under a grammar without a mask, or None. Greedy: the model's best tokens in
        turn, the first the grammar allows (exactly the masked argmax), up to `GUESSES`.
        Sampled: the token drawn from the model's distribution if the grammar allows it, as
        llama.cpp does (with top-k/top-p/min-p, these are taken over the unconstrained
        distribution for an accepted token, over the constrained one after a refusal)."""
        forced = c.forced()
        if forced is not None:  # the one token the mask would allow
            return SampledToken(forced)
        tried = logits
        for attempt in range(self.guesses):
            s = self.sampler.sample(tried, self.history)
            if c.allows(s.token_id, closing=closing):
                return s
            if attempt == 0:
                tried = np.array(logits, dtype=np.float32)
            tried[..., s.token_id] = -np.inf
        return None

    def final(self, reason: FinishReason) -> StreamChunk:
        """The closing chunk when generation ends from outside (cancelled, timeout, error)."""
        chunk = StreamChunk(text="", token_id=None)
        self._close(chunk, reason)
        return chunk

    def _close(self, chunk: StreamChunk, reason: FinishReason) -> None:
        self.usage.completion_tokens = self.n
        if self.n:
            self.usage.decode_ms = (time.perf_counter() - self.t_first) * 1e3
        chunk.finish_reason = reason
        chunk.usage = self.usage
