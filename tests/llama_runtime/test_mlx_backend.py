"""The MLX backend on MLX's CPU backend (how it runs here; Metal runs the same code): exact
weight repacking, the native backend's tokens, streaming, cancellation, batching, embeddings,
sessions moving between backends, and the typed refusals. Kept short: MLX on a CPU is slow."""

from __future__ import annotations

import asyncio
import time

import mlx.core as mx  # the [test] extra installs it (mlx[cpu] on Linux)
import numpy as np
import pytest
from quant_blocks import T, quantized

from llama_engine import UnsupportedBackendError
from llama_runtime.bench import generate_all, prompt_logits

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time",
           "Water boils at"]
N_NEW = 12


@pytest.fixture(scope="module")
def mlx_engine():
    from llama_runtime import create_engine

    engine = create_engine("smollm2-135m-instruct", backend="mlx", threads=2, progress=False)
    yield engine
    engine.close()


def _greedy(engine, prompt: str, n: int = N_NEW) -> list[int]:
    return engine.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K,
                                   T.Q6_K])
def test_gguf_weights_keep_their_exact_values(qtype) -> None:
    from llama_models.checkpoint import dense_float32
    from llama_runtime.mlx_backend.weights import GROUP, QuantWeight, prepare_weight

    raw = quantized(qtype, 16, 512, seed=int(qtype))
    want = dense_float32(raw)
    w = prepare_weight(raw, mx.float32)
    if qtype == T.Q6_K:  # 16-element scales: no MLX group holds them, so it is widened
        assert not isinstance(w, QuantWeight)
        assert np.array_equal(np.array(w), want)
        return
    assert isinstance(w, QuantWeight)
    got = np.array(mx.dequantize(w.w, w.scales, w.biases, group_size=GROUP, bits=w.bits))
    assert np.array_equal(got, want)
    assert np.array_equal(np.array(w.rows(mx.array([3, 11]))), want[[3, 11]])
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    assert np.allclose(np.array(w.matmul(mx.array(x))), x @ want.T, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_and_logits_match_the_native_float_path(mlx_engine, exact_engine) -> None:
    assert mlx_engine.model.backend == "mlx" and mlx_engine.model.device == "cpu"
    assert mlx_engine.stats()["decode"] == "mlx"
    for prompt in PROMPTS[:2]:
        ids = mlx_engine.tokenize(prompt)
        ours, theirs = (prompt_logits(e, ids) for e in (mlx_engine, exact_engine))
        assert np.abs(ours - theirs).max() < 1e-3
        assert _greedy(mlx_engine, prompt) == _greedy(exact_engine, prompt)


def test_stream_and_cancel_within_a_step(mlx_engine) -> None:
    want = _greedy(mlx_engine, PROMPTS[2])
    got = [c.token_id for c in mlx_engine.stream(PROMPTS[2], max_tokens=N_NEW, temperature=0,
                                                 ignore_eos=True) if c.token_id is not None]
    assert got == want
    stream = mlx_engine.stream(PROMPTS[2], max_tokens=2000, temperature=0, ignore_eos=True)
    for n, _ in enumerate(stream):
        if n == 1:
            break
    stream.close()
    assert stream.cancelled
    _settled(mlx_engine)

    async def cancelled_task() -> None:
        async def consume() -> None:
            async for _ in mlx_engine.astream(PROMPTS[3], max_tokens=2000, ignore_eos=True):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

    asyncio.run(cancelled_task())
    _settled(mlx_engine)


def _settled(engine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["kv_blocks_used"] == 0


def test_concurrent_requests_give_their_solo_tokens(mlx_engine) -> None:
    solo = [_greedy(mlx_engine, p, 8) for p in PROMPTS]
    together = generate_all(mlx_engine, PROMPTS, max_tokens=8, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in together] == solo
    _settled(mlx_engine)


def test_a_session_saved_on_one_backend_continues_on_the_other(mlx_engine, exact_engine,
                                                               tmp_path) -> None:
    ids = mlx_engine.tokenize("The history of the Roman empire begins with")
    for src, dst in ((mlx_engine, exact_engine), (exact_engine, mlx_engine)):
        s = src.new_session()
        src.prefill(s, ids)
        path = tmp_path / f"{src.model.backend}.npz"
        src.save_session(s, path)
        want = src.generate(ids, session=s, max_tokens=6, temperature=0,
                            ignore_eos=True).token_ids
        src.close_session(s)
        loaded = dst.load_session(path)
        try:
            got = dst.generate(ids, session=loaded, max_tokens=6, temperature=0,
                               ignore_eos=True).token_ids
        finally:
            dst.close_session(loaded)
        assert got == want


def test_sentence_and_decoder_embeddings_match_the_native_ones(mlx_engine, exact_engine) -> None:
    texts = ["Paris is the capital of France.", "def f(x): return x", "A cat sat."]
    got, want = np.array(mlx_engine.embed(texts)), np.array(exact_engine.embed(texts))
    assert got.shape == want.shape == (3, 384)
    assert np.abs(got - want).max() < 1e-5
    assert mlx_engine._get_embedder().backend == "mlx"
    for engine in (mlx_engine, exact_engine):
        engine.load_embed_model("decoder")
    try:
        got, want = np.array(mlx_engine.embed(texts)), np.array(exact_engine.embed(texts))
    finally:
        for engine in (mlx_engine, exact_engine):
            engine.load_embed_model("all-minilm-l6-v2")
    assert got.shape == (3, 576)
    assert np.min(np.sum(got * want, axis=1)) > 0.9999  # unit vectors: cosine


def test_what_it_cannot_run_is_refused_with_the_way_out(monkeypatch) -> None:
    from llama_runtime import create_engine
    from llama_runtime.mlx_backend.backend import metal_available

    if not metal_available():
        with pytest.raises(UnsupportedBackendError, match="Apple silicon.*device='cpu'"):
            create_engine(backend="mlx", device="metal", progress=False)
        with pytest.raises(UnsupportedBackendError, match="Apple silicon"):
            create_engine(device="metal", progress=False)  # auto: only MLX serves Metal
    with pytest.raises(UnsupportedBackendError, match="backend='torch'"):
        create_engine(backend="mlx", device="cuda", progress=False)
    import llama_runtime.mlx_backend as registered

    monkeypatch.setattr(registered, "mlx_installed", lambda: False)
    with pytest.raises(UnsupportedBackendError, match=r"pip install 'llama-engine\[mlx\]'"):
        create_engine(backend="mlx", progress=False)
    with pytest.raises(UnsupportedBackendError, match=r"Apple silicon.*llama-engine\[mlx\]"):
        create_engine(device="metal", progress=False)  # no backend serves it without mlx

