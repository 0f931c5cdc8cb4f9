"""One bad request never hurts another: validation at submission, per-request failure in the
scheduler, closed engines, sessions nobody holds, preemption under kv_policy="wait"."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
from prompts import PROMPTS

from llama_engine import (
    EngineClosedError,
    GenerationError,
    InvalidParamsError,
    InvalidTokenError,
    KVCacheFull,
    LlamaError,
    ModelSpec,
    SessionError,
)
from llama_runtime.generation import Generation


def _solo(engine, prompt: str, n: int) -> list[int]:
    return engine.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids


def _settle(engine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        now = engine.stats()
        if (now["kv_blocks_used"] == 0 and now["sessions_active"] == 0
                and now["requests_running"] == 0 and now["requests_waiting"] == 0):
            return now
        time.sleep(0.02)
    return engine.stats()


# --- validation at submission ---------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "phrase"), [
    ({"temperature": float("inf")}, InvalidParamsError, "finite"),
    ({"temperature": float("nan")}, InvalidParamsError, "temperature"),
    ({"top_p": float("nan")}, InvalidParamsError, "top_p"),
    ({"min_p": float("-inf")}, InvalidParamsError, "min_p"),
    ({"typical_p": 2.0}, InvalidParamsError, "typical_p"),
    ({"repetition_penalty": float("inf")}, InvalidParamsError, "finite"),
    ({"logit_bias": {10**6: 1.0}}, InvalidTokenError, "outside the vocabulary"),
    ({"logit_bias": {5: float("nan")}}, InvalidParamsError, "logit_bias"),
    ({"logit_bias": [1, 2]}, InvalidParamsError, "mapping"),
    ({"stop_token_ids": [10**7]}, InvalidTokenError, "stop_token_ids"),
    ({"stop": ["x"] * 1000}, InvalidParamsError, "at most"),
    ({"stop": ["y" * 5000]}, InvalidParamsError, "at most"),
    ({"stop": 5}, InvalidParamsError, "list of str"),
])
def test_hostile_parameters_fail_alone_at_submission(engine, kwargs, error, phrase) -> None:
    want = _solo(engine, PROMPTS[0], 16)
    neighbour = engine.stream(PROMPTS[0], max_tokens=16, temperature=0, ignore_eos=True)
    first = next(neighbour)
    with pytest.raises(error, match=phrase):
        engine.generate("hello", max_tokens=4, **kwargs)
    rest = [c.token_id for c in neighbour if c.token_id is not None]
    assert [first.token_id, *rest] == want
    assert _settle(engine)["kv_blocks_used"] == 0


def test_a_temperature_too_small_to_divide_by_is_greedy(engine) -> None:
    """1e-50 with every token biased to -100 used to pass validation and spin the scheduler."""
    vocab = engine.model.vocab_size
    bias = {i: -100.0 for i in range(vocab)}
    greedy = engine.generate("Hello", max_tokens=6, temperature=0, logit_bias=bias)
    tiny = engine.generate("Hello", max_tokens=6, temperature=1e-50, logit_bias=bias)
    assert tiny.token_ids == greedy.token_ids
    assert engine.generate("Hi", max_tokens=2).usage.completion_tokens > 0  # still serving


def _fail_when(monkeypatch, seed: int, error: BaseException) -> None:
    """Fault injection: requests with this seed raise `error` from their sampling step."""
    step = Generation.step

    def failing(self, logits):
        if self.params.seed == seed and self.n >= 2:
            raise error
        return step(self, logits)

    monkeypatch.setattr(Generation, "step", failing)


@pytest.mark.parametrize("error", [RuntimeError("boom"), ZeroDivisionError(), MemoryError(),
                                   InvalidTokenError("bad id")])
def test_a_request_failing_mid_stream_fails_alone(engine, monkeypatch, error) -> None:
    """Whatever one request raises while it is sampled, its own stream gets a LlamaError and
    the requests batched with it finish with their solo tokens."""
    want = [_solo(engine, p, 24) for p in PROMPTS[:3]]
    _fail_when(monkeypatch, 13, error)
    got: list[list[int] | None] = [None] * 3
    bad: list[BaseException] = []
    barrier = threading.Barrier(4)

    def good(i: int) -> None:
        barrier.wait()
        got[i] = engine.generate(PROMPTS[i], max_tokens=24, temperature=0,
                                 ignore_eos=True).token_ids

    def hostile() -> None:
        barrier.wait()
        try:
            engine.generate(PROMPTS[3], max_tokens=24, seed=13, ignore_eos=True)
        except BaseException as e:
            bad.append(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=hostile))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    assert len(bad) == 1 and isinstance(bad[0], LlamaError)
    if not isinstance(error, LlamaError):
        assert isinstance(bad[0], GenerationError) and "sampling" in str(bad[0])
    assert _settle(engine)["kv_blocks_used"] == 0


def test_a_request_failing_at_admission_fails_alone(engine, monkeypatch) -> None:
    cache = engine._cache
    plan = cache.prefill_plan
    victim = engine.tokenize(PROMPTS[5])

    def failing(session_id, token_ids):
        if list(token_ids) == victim:
            raise KeyError("injected")
        return plan(session_id, token_ids)

    monkeypatch.setattr(cache, "prefill_plan", failing)
    with pytest.raises(GenerationError, match="admission"):
        engine.generate(PROMPTS[5], max_tokens=4)
    assert engine.generate(PROMPTS[6], max_tokens=4, temperature=0).usage.completion_tokens == 4
    monkeypatch.undo()
    assert _settle(engine)["kv_blocks_used"] == 0


# --- a closed engine --------------------------------------------------------------------------


def test_a_closed_engine_refuses_everything_at_once() -> None:
    from llama_runtime import create_engine

    with create_engine(threads=2, progress=False) as engine:
        session = engine.new_session()
        running = engine.stream("Once upon a time", max_tokens=200, ignore_eos=True)
        next(running)
    engine.close()  # idempotent
    assert engine.closed
    chunks = list(running)  # the running stream ended, it did not hang
    assert chunks == [] or chunks[-1].finish_reason == "cancelled"
    calls = {
        "generate": lambda: engine.generate("hi"),
        "stream": lambda: engine.stream("hi"),
        "chat": lambda: engine.chat([{"role": "user", "content": "hi"}]),
        "new_session": engine.new_session,
        "prefill": lambda: engine.prefill(session, [1, 2]),
        "decode": lambda: engine.decode(session, engine_params()),
        "tokenize": lambda: engine.tokenize("x"),
        "detokenize": lambda: engine.detokenize([1]),
        "embed": lambda: engine.embed(["x"]),
        "stats": engine.stats,
        "model": lambda: engine.model,
        "load_model": lambda: engine.load_model(ModelSpec(model="smollm2-135m-instruct")),
        "save_session": lambda: engine.save_session(session, "/tmp/never.npz"),
        "load_session": lambda: engine.load_session("/tmp/never.npz"),
    }
    for name, call in calls.items():
        started = time.perf_counter()
        with pytest.raises(EngineClosedError, match="closed"):
            call()
        assert time.perf_counter() - started < 1.0, name
    engine.close_session(session)  # clean-up stays quiet


def engine_params():
    from llama_engine import SamplingParams

    return SamplingParams(max_tokens=2)


# --- nothing kept that nobody holds ------------------------------------------------------------


def test_a_dropped_session_frees_its_blocks(engine) -> None:
    s = engine.new_session()
    engine.prefill(s, engine.tokenize("alpha beta gamma " * 30))
    assert engine.stats()["kv_blocks_used"] > 0
    del s
    stats = _settle(engine)
    assert stats["kv_blocks_used"] == 0 and stats["sessions_active"] == 0
    engine._cache.check()


def test_reloading_a_model_frees_the_old_one() -> None:
    from llama_runtime import create_engine

    engine = create_engine(threads=2, progress=False)
    s = engine.new_session()
    old_store, old_model = weakref.ref(engine._store), weakref.ref(engine._backend._model)
    engine.load_model(ModelSpec(model="smollm2-135m-instruct"))
    gc.collect()
    assert old_store() is None and old_model() is None
    with pytest.raises(SessionError, match="closed"):
        engine.prefill(s, [1, 2, 3])
    assert engine.generate("Hi", max_tokens=2).usage.completion_tokens > 0
    engine.close()


def test_a_stream_stops_when_closed_by_its_context_manager(engine) -> None:
    with engine.stream("Once upon a time", max_tokens=200, ignore_eos=True) as stream:
        for _ in stream:
            break
        assert engine.stats()["requests_running"] + engine.stats()["requests_waiting"] <= 1
    assert _settle(engine)["requests_running"] == 0
    assert stream.finish_reason == "cancelled"


def test_breaking_out_of_a_loop_over_a_temporary_stream_stops_it(engine) -> None:
    for _ in engine.stream("Once upon a time", max_tokens=500, ignore_eos=True):
        break
    started = time.monotonic()
    _settle(engine)
    assert time.monotonic() - started < 5  # not the ~500 steps the request asked for


# --- kv_policy="wait" preempts ----------------------------------------------------------------


@pytest.mark.slow
def test_twelve_long_streams_in_a_pool_for_three_finish_with_their_solo_tokens(engine) -> None:
    from llama_runtime import create_engine

    n = 64
    solo = [_solo(engine, p, n) for p in PROMPTS]
    per_stream = -(-(n + 16) // 16)  # prompt (< 16 tokens) + n generated
    stats = engine.stats()  # KV bytes a block of 16 tokens, in the default kv_dtype:
    block_bytes = stats["kv_bytes_total"] // stats["kv_blocks_total"]
    small = create_engine(threads=2, progress=False, kv_memory=3 * per_stream * block_bytes,
                          kv_policy="wait")
    assert small.stats()["kv_blocks_total"] == 3 * per_stream
    got: list[list[int] | None] = [None] * len(PROMPTS)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        try:
            got[i] = _solo(small, PROMPTS[i], n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert got == solo
    stats = _settle(small)
    assert stats["kv_blocks_used"] == 0
    small._cache.check()
    # a request that cannot fit the whole pool by itself still fails, and only it
    with pytest.raises(KVCacheFull, match="KV"):
        small.generate("Hello", max_tokens=3 * per_stream * 16 + 100, ignore_eos=True)
    assert small.generate("Hello", max_tokens=4, temperature=0).usage.completion_tokens == 4
    small.close()
