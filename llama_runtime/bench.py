"""The measurements behind `llama-engine bench` (and bench/peers.py's own-engine column)."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from llama_engine import Completion, LlamaEngine

__all__ = ["at_once", "generate_all", "make_prompt", "peak_rss_mb", "prompt_logits", "run_bench"]

_FILLER = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines "
    "were programmed by rewiring panels; later, stored programs let the same hardware run "
    "different tasks. Compilers turned readable text into machine instructions, operating "
    "systems shared one processor among many users, and networks joined machines across the "
    "world. Each layer hid the details below it so that people could think about larger "
    "problems. "
)

T = TypeVar("T")


def prompt_logits(engine: LlamaEngine, ids: Sequence[int]) -> Any:
    """The engine's next-token logits after prefilling `ids` in a session of their own."""
    s = engine.new_session()
    try:
        engine.prefill(s, ids)
        return engine.next_token_logits(s)
    finally:
        engine.close_session(s)


def make_prompt(engine: LlamaEngine, n_tokens: int, variant: int = 0) -> list[int]:
    """Exactly `n_tokens` ids of ordinary English text; `variant` changes the first words so
    concurrent requests do not share a prefix."""
    text = f"Request {variant}. " + _FILLER
    ids = engine.tokenize(text, add_special=True)
    while len(ids) < n_tokens:
        ids += engine.tokenize(_FILLER, add_special=False)
    return ids[:n_tokens]


def at_once(fn: Callable[[int], T], n: int) -> list[T]:
    """fn(0) .. fn(n - 1), a thread each, all released together so an engine's scheduler
    serves them together; their results in order. The first call's error, if any, is raised
    once all have ended."""
    done: list[T | BaseException | None] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        try:
            done[i] = fn(i)
        except BaseException as e:
            done[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in done:
        if isinstance(c, BaseException):
            raise c
    return done  # type: ignore[return-value]


def generate_all(engine: LlamaEngine, prompts: Sequence[str | Sequence[int]],
                 **sampling: Any) -> list[Completion]:
    """`engine.generate(prompt, **sampling)` for every prompt at once (`at_once`);
    completions in prompt order."""
    return at_once(lambda i: engine.generate(prompts[i], **sampling), len(prompts))


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_bench(engine: LlamaEngine, *, prompt_tokens: int = 512, gen_tokens: int = 128,
              concurrency: int = 1) -> dict[str, Any]:
    """Single-request prefill/decode/TTFT, then `concurrency` requests at once (threads)."""
    warm = make_prompt(engine, 16, variant=-1)
    engine.generate(warm, max_tokens=4, temperature=0, ignore_eos=True)
    single = engine.generate(make_prompt(engine, prompt_tokens), max_tokens=gen_tokens,
                             temperature=0, ignore_eos=True)
    u = single.usage
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": round(u.prefill_tok_s, 2),
        "decode_tok_s": round(u.decode_tok_s, 2),
        "ttft_ms": round(u.ttft_ms, 2),
        "concurrency": concurrency,
    }
    prompts = [make_prompt(engine, prompt_tokens, variant=i + 1) for i in range(concurrency)]
    t0 = time.perf_counter()
    done = generate_all(engine, prompts, max_tokens=gen_tokens, temperature=0, ignore_eos=True)
    wall = time.perf_counter() - t0
    result["aggregate_tok_s"] = round(sum(len(c.token_ids) for c in done) / wall, 2)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result
