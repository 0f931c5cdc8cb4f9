"""One request's token-by-token state: sampling, detokenization, stop checks and usage.

Backend-neutral: it receives each step's logits (numpy) and returns the chunk to emit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from llama_engine import FinishReason, SamplingParams, StreamChunk, Usage
from llama_sampling import Sampler, StopChecker
from llama_sampling.constraint import Grammar, closing_margin
from llama_tokenizer import Tokenizer

__all__ = ["Generation"]


class Generation:
    """Turns successive logits into chunks until a finish condition holds."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, history: Sequence[int],
                 *, usage: Usage, started_at: float, context_length: int,
                 grammar: Grammar | None = None) -> None:
        """`grammar`: params.response_format compiled for this tokenizer (at submission)."""
        self.params = params
        self.constraint = None if grammar is None else grammar.constraint()
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
        if self.constraint is not None:  # tokens the grammar does not allow next: -inf
            logits = np.array(logits, dtype=np.float32)
            left = min(self.params.max_tokens - self.n,
                       self.context_length - len(self.history) - 1)
            self.constraint.mask(logits, closing=left <= self.closing_margin)
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
