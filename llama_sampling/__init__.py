"""Sampling for llama-engine: logits processors, a seeded per-request sampler, stop strings.

Backend-neutral: everything works on 1-D numpy float32 logits (the backend hands them over), and
nothing here imports torch or MLX.

    sampler = Sampler(params)               # one per request
    tok = sampler.sample(logits, history)   # -> SampledToken(token_id, logprob, top_logprobs)
    stop = StopChecker(params.stop)
    text, stopped = stop.push(delta)
"""

from llama_sampling.processors import (
    LogitsProcessor,
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
from llama_sampling.sampler import SampledToken, Sampler
from llama_sampling.stop import StopChecker, is_stop_token

__all__ = [
    "LogitsProcessor",
    "SampledToken",
    "Sampler",
    "StopChecker",
    "build_processors",
    "frequency_presence_penalty",
    "is_stop_token",
    "logit_bias",
    "min_p",
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
]
