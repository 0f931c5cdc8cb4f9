"""The engine's conveniences on the real default model."""

from __future__ import annotations

import asyncio

import pytest

from llama_engine import (
    ContextOverflowError,
    InvalidParamsError,
    InvalidTokenError,
    SamplingParams,
    SessionError,
)

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_greedy_is_deterministic_and_counts_usage(engine) -> None:
    a = engine.generate("The three primary colours are", max_tokens=12, temperature=0)
    b = engine.generate("The three primary colours are", max_tokens=12, temperature=0)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.usage.prompt_tokens == len(engine.tokenize("The three primary colours are"))
    assert a.usage.completion_tokens == len(a.token_ids) <= 12
    assert a.usage.ttft_ms > 0
    assert a.text == engine.detokenize(a.token_ids, skip_special=True) or a.finish_reason == "stop"


def test_same_seed_same_tokens_other_seeds_differ(engine) -> None:
    def run(seed: int) -> list[int]:
        return engine.generate("My favourite animal is", max_tokens=16, temperature=1.0,
                               top_k=0, top_p=1.0, min_p=0.0, seed=seed).token_ids

    first = run(7)
    assert run(7) == first
    assert any(run(s) != first for s in (8, 9, 10))


def test_max_tokens_ends_with_length(engine) -> None:
    c = engine.generate("Count: one, two, three,", max_tokens=5, temperature=0, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.token_ids) == 5


def test_stop_string_cuts_the_text_before_it(engine) -> None:
    full = engine.generate("List the planets: Mercury, Venus,", max_tokens=24, temperature=0,
                           ignore_eos=True)
    # pick a stop string from the middle of the greedy text: it must be cut there
    words = full.text.split()
    assert len(words) > 3, full.text
    stop = words[2]
    cut = engine.generate("List the planets: Mercury, Venus,", max_tokens=24, temperature=0,
                          ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_stream_chunks_add_up_to_generate(engine) -> None:
    chunks = list(engine.stream("Water boils at", max_tokens=16, temperature=0))
    whole = engine.generate("Water boils at", max_tokens=16, temperature=0)
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.token_id for c in chunks if c.token_id is not None] == whole.token_ids
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage is not None
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_logprobs_of_greedy_token_is_the_top_one(engine) -> None:
    c = engine.generate("The sky is", max_tokens=4, temperature=0, logprobs=3)
    assert c.logprobs is not None and c.top_logprobs is not None
    for tid, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
        assert len(top) == 3 and max(top, key=top.get) == tid
        assert lp == pytest.approx(top[tid]) and lp <= 0


def test_chat_answers_and_multi_turn_reuses_the_cache(engine) -> None:
    s = engine.new_session()
    try:
        first = engine.chat(QUESTION, session=s, max_tokens=40, temperature=0)
        # earlier tests' chats may have left the default system prompt's blocks cached
        assert first.usage.cached_tokens % 16 == 0
        assert first.usage.cached_tokens < first.usage.prompt_tokens
        turn_one_tokens = len(s.tokens)
        messages = [*QUESTION, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And two more?"}]
        second = engine.chat(messages, session=s, max_tokens=20, temperature=0)
        # everything turn one computed is reused; only the new turn is prefilled
        assert second.usage.cached_tokens >= turn_one_tokens - 1
        assert second.usage.prompt_tokens > second.usage.cached_tokens
    finally:
        engine.close_session(s)


def test_async_stream_matches_sync(engine) -> None:
    async def run() -> str:
        parts = [c.text async for c in engine.astream("Snow is", max_tokens=10, temperature=0)]
        return "".join(parts)

    assert asyncio.run(run()) == engine.generate("Snow is", max_tokens=10, temperature=0).text
    assert asyncio.run(engine.agenerate("Snow is", max_tokens=10, temperature=0)).text == (
        engine.generate("Snow is", max_tokens=10, temperature=0).text)


def test_closing_a_stream_frees_its_session(engine) -> None:
    before = engine.stats()["sessions_active"]
    stream = engine.stream("Tell me a long story about dragons.", max_tokens=200, temperature=0,
                           ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert engine.stats()["sessions_active"] == before


def test_cancelling_the_task_frees_its_session(engine) -> None:
    before = engine.stats()["sessions_active"]

    async def main() -> None:
        async def consume() -> None:
            async for _ in engine.astream("Write an essay about the sea.", max_tokens=300,
                                          ignore_eos=True):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.stats()["sessions_active"] == before:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.stats()["sessions_active"] == before


def test_bad_requests_raise_typed_errors(engine) -> None:
    with pytest.raises(InvalidParamsError, match="temperature must be >= 0"):
        engine.generate("hi", temperature=-1)
    with pytest.raises(InvalidParamsError, match="unknown sampling parameter"):
        engine.generate("hi", temprature=0.5)
    with pytest.raises(InvalidTokenError, match="1000000 is outside the vocabulary"):
        engine.detokenize([1, 2, 10**6])
    with pytest.raises(InvalidTokenError):
        engine.generate([5, -1, 7], max_tokens=2)
    long_prompt = "word " * (engine.model.context_length + 10)
    with pytest.raises(ContextOverflowError, match="shorten the prompt"):
        engine.generate(long_prompt, max_tokens=2)
    with pytest.raises(InvalidParamsError, match="prompt is empty"):
        engine.generate("", max_tokens=2)


def test_closed_or_unprefilled_sessions_are_refused(engine) -> None:
    from llama_engine import SamplingParams

    s = engine.new_session()
    with pytest.raises(SessionError, match="prefill"):
        engine.decode(s, SamplingParams())
    engine.close_session(s)
    with pytest.raises(SessionError, match="closed"):
        engine.generate("hi", session=s)


def test_chat_accepts_openai_content_parts(engine) -> None:
    plain = engine.chat([{"role": "user", "content": "Name a colour.\nOne word."}],
                        max_tokens=6, temperature=0)
    parts = engine.chat([{"role": "user", "content": [
        {"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]}],
        max_tokens=6, temperature=0)
    assert parts.token_ids == plain.token_ids
    with pytest.raises(InvalidParamsError, match="only 'text' parts"):
        engine.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(InvalidParamsError, match="content part 0"):
        engine.chat([{"role": "user", "content": ["just a string"]}])


def test_a_session_is_a_read_only_view_of_the_kv_cache(engine) -> None:
    """The KV cache owns a session's tokens: `tokens` reads them (a copy a caller may change
    freely), follows prefill and decode, cannot be assigned, and is empty once closed."""
    s = engine.new_session()
    ids = engine.tokenize("The capital of France is")
    engine.prefill(s, ids)
    assert s.tokens == ids
    mine = s.tokens
    mine.append(7)
    assert s.tokens == ids  # the caller's copy, not the session
    with pytest.raises(AttributeError):
        s.tokens = [1, 2, 3]
    out = engine.decode(s, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    got = [c.token_id for c in out if c.token_id is not None]
    assert s.tokens == ids + got[:-1]  # the last sampled token is not fed (no forward)
    assert engine._cache.context(s.id) == s.tokens
    engine.close_session(s)
    assert s.tokens == []
