"""Many sessions on one model: batching, prefix sharing, cancellation, KV limits."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import numpy as np
import pytest
from prompts import PROMPTS as ALL_PROMPTS

from llama_engine import KVCacheFull
from llama_runtime.bench import generate_all

PROMPTS = ALL_PROMPTS[:8]


def _settle(engine, before: dict, keys=("kv_blocks_used", "sessions_active")) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = engine.stats()
        if all(now[k] == before[k] for k in keys) and now["requests_running"] == 0:
            return now
        time.sleep(0.02)
    return engine.stats()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_eight_concurrent_sessions_give_their_solo_greedy_tokens(backend, request) -> None:
    engine = request.getfixturevalue("engine" if backend == "native" else "torch_cpu_engine")
    assert engine.model.backend == backend
    solo = [engine.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids
            for p in PROMPTS]
    together = generate_all(engine, PROMPTS, max_tokens=24, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in together] == solo
    assert _settle(engine, {"kv_blocks_used": 0, "sessions_active": 0})["kv_blocks_used"] == 0


@pytest.mark.slow
def test_hundred_cancelled_streams_leak_no_blocks(engine) -> None:
    before = _settle(engine, engine.stats())
    rng = random.Random(0)
    cuts = [rng.randrange(0, 6) for _ in range(100)]

    def consume(i: int) -> None:
        stream = engine.stream(f"Story number {i}: once", max_tokens=40, ignore_eos=True,
                               seed=i)
        for n, _ in enumerate(stream):
            if n >= cuts[i]:
                break
        stream.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()

    async def tasks() -> None:
        async def one(i: int) -> None:
            async for _ in engine.astream(f"Story number {i}: once", max_tokens=40,
                                          ignore_eos=True, seed=i):
                pass

        running = [asyncio.create_task(one(i)) for i in range(50, 100)]
        await asyncio.sleep(0.5)
        for i, t in enumerate(running):
            if i % 2 == 0:
                t.cancel()
            await asyncio.sleep(rng.random() * 0.02)
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    asyncio.run(tasks())
    for t in threads:
        t.join()
    after = _settle(engine, before)
    assert after["kv_blocks_used"] == before["kv_blocks_used"]
    assert after["sessions_active"] == before["sessions_active"]
    total = after["kv_blocks_free"] + after["kv_blocks_used"] + after["kv_blocks_cached"]
    assert total == after["kv_blocks_total"]


@pytest.mark.slow
def test_shared_system_prompt_is_prefilled_once(engine) -> None:
    system = ("You are a careful assistant for a company that builds bicycles. " * 20).strip()
    assert len(engine.tokenize(system)) >= 200
    first = engine.chat([{"role": "system", "content": system},
                         {"role": "user", "content": "What do you build?"}],
                        max_tokens=4, temperature=0)
    second = engine.chat([{"role": "system", "content": system},
                          {"role": "user", "content": "Who are you?"}],
                         max_tokens=4, temperature=0)
    assert first.usage.cached_tokens < 16
    assert second.usage.cached_tokens >= 192


def test_timeout_cancels_the_request(engine) -> None:
    c = engine.generate("Write a very long essay about the ocean.", max_tokens=2000,
                        ignore_eos=True, timeout=0.3)
    assert c.finish_reason == "cancelled" and len(c.token_ids) < 2000


def test_stats_have_the_contract_keys(engine) -> None:
    s = engine.stats()
    for k in ("kv_blocks_total", "kv_blocks_free", "kv_blocks_cached", "sessions_active",
              "requests_waiting"):
        assert isinstance(s[k], int), k


@pytest.mark.slow
def test_over_budget_request_fails_or_waits_by_policy_and_engine_keeps_serving(engine) -> None:
    from llama_runtime import create_engine

    # 40 blocks of 16 tokens = 640 tokens of KV in all, at the default engine's KV bytes a block
    # (K and V of 30 layers, 3 KV heads of 64, in its kv_dtype)
    stats = engine.stats()
    per_block = stats["kv_bytes_total"] // stats["kv_blocks_total"]
    strict = create_engine(threads=2, progress=False, kv_memory=40 * per_block,
                           kv_policy="fail")
    assert strict.stats()["kv_blocks_total"] == 40
    long_prompt = "alpha beta gamma delta " * 200  # ~800 tokens
    with pytest.raises(KVCacheFull, match="KV"):
        strict.generate(long_prompt, max_tokens=4)
    assert strict.generate("Hello", max_tokens=4, temperature=0).usage.completion_tokens > 0
    assert strict.stats()["kv_blocks_used"] == 0

    patient = create_engine(threads=2, progress=False, kv_memory=40 * per_block,
                            kv_policy="wait")
    mid = "alpha beta gamma delta " * 80  # ~320 tokens: two fit only one after the other
    results: list[int] = []

    def run() -> None:
        results.append(len(patient.generate(mid, max_tokens=8, ignore_eos=True).token_ids))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [8, 8, 8]


@pytest.mark.parametrize("saver", ["native", "torch"])
def test_saved_session_continues_exactly(engine, saver, request, tmp_path) -> None:
    """Saved by either backend, restored into the default (native) engine: the sessions'
    format is shared, and both fused steps compute the same bits."""
    from llama_engine import SessionError

    source = engine if saver == "native" else request.getfixturevalue("torch_cpu_engine")
    assert source.model.backend == saver
    msgs = [{"role": "user", "content": "Give me two fruit names."}]
    s = source.new_session()
    first = source.chat(msgs, session=s, max_tokens=12, temperature=0)
    source.save_session(s, tmp_path / "s.pt")
    follow = [*msgs, {"role": "assistant", "content": first.text},
              {"role": "user", "content": "One more?"}]
    want = source.chat(follow, session=s, max_tokens=12, temperature=0)
    source.close_session(s)

    restored = engine.load_session(tmp_path / "s.pt")
    got = engine.chat(follow, session=restored, max_tokens=12, temperature=0)
    assert got.token_ids == want.token_ids
    assert got.usage.cached_tokens == want.usage.cached_tokens > 0
    engine.close_session(restored)

    with np.load(tmp_path / "s.pt") as f:
        data = dict(f)
    header = json.loads(str(data["header"]))
    data["header"] = np.array(json.dumps({**header, "model": "llama-0000"}))
    with open(tmp_path / "other.pt", "wb") as out:
        np.savez(out, **data)
    with pytest.raises(SessionError, match="saved from another model"):
        engine.load_session(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a session")
    with pytest.raises(SessionError, match="not a saved llama-engine session"):
        engine.load_session(tmp_path / "junk.pt")
