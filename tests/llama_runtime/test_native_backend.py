"""The native backend: the fused step's kernels built without torch, driven over ctypes. It
must run without importing torch, compute what the torch backend's fused step computes, and
behave like any engine (sessions, errors). It is the default engine, so the rest of the suite
(batching, cancellation, adapters...) runs on it too."""

from __future__ import annotations

import numpy as np
import pytest

from llama_engine import InvalidParamsError, SamplingParams, UnsupportedBackendError
from llama_runtime.bench import prompt_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def native_exact():
    from llama_runtime import create_engine

    return create_engine(backend="native", threads=2, progress=False, decode="exact")


@pytest.fixture(scope="module")
def native():
    from llama_runtime import create_engine

    return create_engine(backend="native", threads=2, progress=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_native_equals_the_torch_backend(native_exact, exact_engine, prompt: str) -> None:
    ids = exact_engine.tokenize(prompt)
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    assert native_exact.generate(ids, params=p).token_ids == \
        exact_engine.generate(ids, params=p).token_ids
    assert np.array_equal(prompt_logits(native_exact, ids), prompt_logits(exact_engine, ids))


def test_the_default_native_step_matches_the_torch_backends(native, torch_cpu_engine) -> None:
    assert native.decode_kernel == torch_cpu_engine.decode_kernel == "mixed"
    ids = native.tokenize(PROMPTS[2])
    got = []
    for e in (native, torch_cpu_engine):
        s = e.new_session()
        e.prefill(s, ids)
        e.decode(s, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)).collect()
        got.append((list(s.tokens), e.next_token_logits(s)))
        e.close_session(s)
    assert got[0][0] == got[1][0]
    # the same kernels, weights, embeddings and RoPE tables: the same bits
    assert np.array_equal(got[0][1], got[1][1])


def test_decoder_embeddings_match_the_torch_backend(native_exact) -> None:
    from llama_runtime import create_engine

    texts = ["Paris is the capital of France.", "def f(x): return x", "A cat sat."]
    torch_side = create_engine(backend="torch", threads=2, progress=False,
                               embed_model="decoder")
    native_exact.load_embed_model("decoder")
    try:
        got = np.array(native_exact.embed(texts, batch_size=2))
    finally:
        native_exact.load_embed_model("all-minilm-l6-v2")
    want = np.array(torch_side.embed(texts))
    assert got.shape == want.shape == (3, 576)
    # one decoder-embedding path on a CPU (the fused step's hidden states): the same bits
    assert np.array_equal(got, want)
    op_by_op = create_engine(backend="torch", threads=2, progress=False, decode="torch",
                             embed_model="decoder")  # torch's own path (what CUDA runs)
    ref = np.array(op_by_op.embed(texts))
    assert np.min(np.sum(got * ref, axis=1)) > 0.9999  # unit vectors: cosine


def test_what_it_cannot_run_is_refused_with_the_way_out(tmp_path) -> None:
    from llama_runtime import create_engine

    with pytest.raises(UnsupportedBackendError, match="backend='torch'"):
        create_engine(backend="native", device="cuda", progress=False)
    with pytest.raises(InvalidParamsError, match="backend='torch'"):
        create_engine(backend="native", decode="torch", progress=False)
    # option values are checked against the registry's table of the backend asked for
    with pytest.raises(InvalidParamsError, match="float32.*needs backend='torch'"):
        create_engine(backend="native", dtype="bfloat16", progress=False)
    with pytest.raises(InvalidParamsError, match="kv_dtype"):
        create_engine(backend="native", kv_dtype="bfloat16", progress=False)


def test_threads_option_reaches_the_kernels(torch_cpu_engine) -> None:
    """The kernels' thread count is process-wide: each engine (and its sentence encoder) sets
    its own before each forward."""
    from llama_runtime import create_engine
    from llama_runtime.kernels.library import library

    one = create_engine(backend="native", threads=1, progress=False)
    assert one.threads == 1  # set in the library before each of its forwards
    assert len(one.generate("Hello", max_tokens=4, temperature=0).token_ids) == 4
    assert library().le_threads() == 1
    torch_cpu_engine.generate("Hello", max_tokens=2, temperature=0)  # threads=2, fused step
    assert library().le_threads() == 2
    one.embed(["a sentence"])  # the encoder beside an engine runs on the engine's threads
    assert library().le_threads() == 1
    with pytest.raises(InvalidParamsError, match="threads"):
        create_engine(backend="native", threads=0, progress=False)


def test_info_lists_the_native_backend() -> None:
    from llama_runtime import available_backends

    info = {b.name: b for b in available_backends()}["native"]
    assert info.available and info.devices == ("cpu",)
    assert "Q4_1" in info.quant_native
