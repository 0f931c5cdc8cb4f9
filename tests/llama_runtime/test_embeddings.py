"""`embed()` on the engine: the encoder beside a generating model, an embeddings-only engine,
mean-pooled decoder states, bad input, and `llama-engine embed`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from llama_engine import (
    ContextOverflowError,
    InvalidParamsError,
    ModelNotFoundError,
    SessionError,
    UnsupportedArchitectureError,
)
from llama_models import resolve_model_path
from llama_runtime import create_engine

TEXTS = [
    "The cat sits on the mat.",
    "Le chat est assis sur le tapis.",
    "東京は日本の首都です。",
    "def add(a, b):\n    return a + b",
    "Emoji 🙂🚀 and accents: café, naïve.",
    "",
    " ".join(f"token{i}" for i in range(400)),  # past max_seq_length: cut at 256 tokens
]
LONG = TEXTS[-1]


@pytest.fixture(scope="module")
def both():
    """One engine that generates (smollm2) and embeds (all-minilm-l6-v2)."""
    eng = create_engine("smollm2-135m-instruct", embed_model="all-minilm-l6-v2", threads=2,
                        progress=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def st_vectors() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve_model_path("all-minilm-l6-v2")), device="cpu")
    return st.encode(TEXTS)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_one_engine_generates_and_embeds(both, st_vectors: np.ndarray) -> None:
    assert both.embed_model_name == "all-minilm-l6-v2"
    vecs = np.array(both.embed(TEXTS))
    assert vecs.shape == (len(TEXTS), 384)
    assert _cos(vecs, st_vectors).min() >= 0.9999
    out = both.generate("The capital of France is", max_tokens=4, temperature=0)
    assert out.token_ids and out.text


def test_embeddings_only_engine() -> None:
    eng = create_engine(model=None, threads=2)
    assert eng.embed_model_name == "all-minilm-l6-v2"
    assert len(eng.embed(["hello"])[0]) == 384
    stats = eng.stats()
    assert stats["sessions_active"] == 0 and stats["kv_blocks_total"] == 0
    with pytest.raises(SessionError, match="no model is loaded"):
        eng.generate("hi", max_tokens=2)


def test_bad_input_raises_typed_errors(both) -> None:
    assert both.embed([]) == []
    with pytest.raises(InvalidParamsError, match="wrap it in a list"):
        both.embed("a single string")
    with pytest.raises(InvalidParamsError, match=r"texts\[1\] must be a str"):
        both.embed(["ok", 42])
    with pytest.raises(InvalidParamsError, match="batch_size"):
        both.embed(["ok"], batch_size=0)
    with pytest.raises(InvalidParamsError, match="truncate"):
        both.embed(["ok"], truncate="no")
    with pytest.raises(ContextOverflowError, match="truncate=True"):
        both.embed([LONG], truncate=False)
    with pytest.raises(InvalidParamsError, match="model=None"):
        create_engine(model=None, embed_model="decoder")
    with pytest.raises(UnsupportedArchitectureError, match="embed_model"):
        create_engine("all-minilm-l6-v2")
    with pytest.raises(ModelNotFoundError):
        create_engine(model=None, embed_model="no-such-embedder")


def test_decoder_mean_pooled_embeddings(both) -> None:
    both.load_embed_model("decoder")
    try:
        assert both.embed_model_name == "decoder:smollm2-135m-instruct"
        texts = ["The cat sits on the mat.", "A cat is sitting on a mat.",
                 "Quarterly revenue grew by five percent."]
        vecs = np.array(both.embed(texts))
        assert vecs.shape == (3, 576)  # SmolLM2-135M's hidden size
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2])
        alone = np.array(both.embed([texts[2]]))[0]  # batching does not change a vector
        np.testing.assert_allclose(alone, vecs[2], atol=1e-4)
    finally:
        both.load_embed_model("all-minilm-l6-v2")


def test_decoder_embeddings_while_generating(both) -> None:
    """Decoder embeddings share the model with the scheduler thread; they take turns."""
    prompt = "Write a short poem about the sea."
    expected = both.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids
    both.load_embed_model("decoder")
    try:
        got: list[list[int]] = []
        t = threading.Thread(target=lambda: got.append(both.generate(
            prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids))
        t.start()
        first = np.array(both.embed(["sea and waves"] * 4))
        while t.is_alive():
            np.testing.assert_allclose(np.array(both.embed(["sea and waves"]))[0], first[0],
                                       atol=1e-4)
        t.join()
        assert got == [expected]
    finally:
        both.load_embed_model("all-minilm-l6-v2")


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("llama-engine")
    cmd = [exe] if exe else [sys.executable, "-m", "llama_runtime.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300,
                          check=False, input=stdin)


def test_cli_embed_prints_json(st_vectors: np.ndarray) -> None:
    r = _cli("embed", TEXTS[0], TEXTS[2], "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "all-minilm-l6-v2" and out["dim"] == 384
    assert [d["text"] for d in out["data"]] == [TEXTS[0], TEXTS[2]]
    vecs = np.array([d["embedding"] for d in out["data"]])
    assert _cos(vecs, st_vectors[[0, 2]]).min() >= 0.9999


def test_cli_embed_errors_are_one_line() -> None:
    r = _cli("embed", "hello", "--model", "no-such-embedder")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    r = _cli("embed", LONG, "--no-truncate")
    assert r.returncode == 2 and "truncate" in r.stderr


def test_cli_info_describes_an_embedding_model() -> None:
    r = _cli("info", "all-minilm-l6-v2", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "embedding" and info["embedding_dim"] == 384
    assert info["pooling"] == "mean" and info["normalize"] is True
    assert info["max_seq_length"] == 256
