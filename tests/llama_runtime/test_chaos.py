"""Chaos: normal streams run while 1,000 cancellations, closes, dropped sessions and hostile
requests arrive from threads and asyncio tasks. Every normal stream must give its solo output,
and afterwards no KV block, session or request is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import threading
import time

import pytest
from prompts import PROMPTS

from llama_engine import LlamaError

NORMAL = PROMPTS[:6]
N_TOKENS = 32
EVENTS = 1000
HOSTILE = [
    {"temperature": float("inf")},
    {"temperature": -1.0},
    {"top_p": float("nan")},
    {"logit_bias": {10**9: 5.0}},
    {"stop_token_ids": [-3]},
    {"max_tokens": 0},
    {"stop": ["z"] * 500},
    {"min_p": 7},
    {"seed": "x"},
    {"typical_p": float("-inf")},
    {"nonsense": 1},
]


def _chaos_event(engine, rng: random.Random, sessions: list) -> str:
    kind = rng.choice(["cancel", "close_session", "hostile", "timeout", "drop", "tokens"])
    prompt = rng.choice(NORMAL) + " " + " ".join(rng.choice("abcdefgh") for _ in range(
        rng.randint(0, 40)))
    if kind == "cancel":
        stream = engine.stream(prompt, max_tokens=rng.randint(1, 40), seed=rng.randint(0, 99))
        for _ in range(rng.randint(0, 3)):
            if next(stream, None) is None:
                break
        stream.close()
    elif kind == "close_session":
        s = engine.new_session()
        stream = engine.stream(prompt, session=s, max_tokens=30)
        threading.Timer(rng.random() * 0.05, engine.close_session, args=(s,)).start()
        try:
            for _ in stream:
                pass
        except LlamaError:
            pass  # closed before it was admitted
    elif kind == "hostile":
        try:
            engine.generate(prompt, **rng.choice(HOSTILE))
        except LlamaError:
            pass
        else:
            raise AssertionError("a hostile request was accepted")
    elif kind == "timeout":
        engine.generate(prompt, max_tokens=50, timeout=rng.random() * 0.05)
    elif kind == "drop":
        s = engine.new_session()
        engine.prefill(s, engine.tokenize(prompt))
        if rng.random() < 0.5:
            sessions.append(s)  # dropped later, all together
    else:  # raw token ids, some outside the vocabulary
        ids = [rng.randint(0, engine.model.vocab_size + 10) for _ in range(rng.randint(1, 8))]
        with contextlib.suppress(LlamaError):
            engine.generate(ids, max_tokens=2)
    return kind


async def _async_chaos(engine, rng: random.Random, n: int) -> None:
    for _ in range(n):
        prompt = rng.choice(NORMAL)
        if rng.random() < 0.5:
            async def consume(p: str = prompt) -> None:
                async for _ in engine.astream(p, max_tokens=40):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(rng.random() * 0.03)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            with contextlib.suppress(LlamaError):
                await engine.agenerate(prompt, **rng.choice(HOSTILE))


@pytest.mark.slow
def test_normal_streams_survive_a_thousand_hostile_events(engine) -> None:
    solo = {p: engine.generate(p, max_tokens=N_TOKENS, temperature=0, ignore_eos=True).token_ids
            for p in NORMAL}
    results: dict[str, list[int]] = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def normal(prompt: str) -> None:
        try:
            while not stop.is_set():  # keep normal traffic running through the whole storm
                got = engine.generate(prompt, max_tokens=N_TOKENS, temperature=0,
                                      ignore_eos=True).token_ids
                if got != solo[prompt]:
                    results[prompt] = got
                    return
                results.setdefault(prompt, got)
        except BaseException as e:
            failures.append(e)

    async def normal_async(prompt: str) -> None:
        while not stop.is_set():
            got = (await engine.agenerate(prompt, max_tokens=N_TOKENS, temperature=0,
                                          ignore_eos=True)).token_ids
            if got != solo[prompt]:
                results[prompt] = got
                return
            results.setdefault(prompt, got)

    counts: dict[str, int] = {}
    dropped: list = []

    def chaos(seed: int, n: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(n):
                kind = _chaos_event(engine, rng, dropped)
                counts[kind] = counts.get(kind, 0) + 1
        except BaseException as e:
            failures.append(e)

    def asyncio_side() -> None:
        async def main() -> None:
            normals = [asyncio.create_task(normal_async(p)) for p in NORMAL[4:]]
            await _async_chaos(engine, random.Random(99), 100)
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await asyncio.gather(*normals)

        try:
            asyncio.run(main())
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=normal, args=(p,)) for p in NORMAL[:4]]
    chaos_threads = [threading.Thread(target=chaos, args=(i, (EVENTS - 100) // 3))
                     for i in range(3)]
    side = threading.Thread(target=asyncio_side)
    started = time.monotonic()
    for t in [*threads, *chaos_threads, side]:
        t.start()
    for t in chaos_threads:
        t.join(timeout=600)
    stop.set()
    for t in [*threads, side]:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in [*threads, *chaos_threads, side]), "a thread hung"
    assert failures == []
    assert sum(counts.values()) == 3 * ((EVENTS - 100) // 3)
    assert results == solo
    dropped.clear()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        gc.collect()
        stats = engine.stats()
        if stats["kv_blocks_used"] == 0 and stats["sessions_active"] == 0 and \
                stats["requests_running"] == 0 and stats["requests_waiting"] == 0:
            break
        time.sleep(0.05)
    assert (stats["kv_blocks_used"], stats["sessions_active"], stats["requests_running"],
            stats["requests_waiting"]) == (0, 0, 0, 0), stats
    engine._cache.check()
    assert time.monotonic() - started < 600
