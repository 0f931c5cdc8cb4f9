"""The parity gate: backends against the float32 reference, cached; `auto` picks only a backend
that passed, and a backend that failed is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_engine import ParityError
from llama_models import open_model
from llama_runtime import create_engine
from llama_runtime.parity import (
    MIN_EQUAL,
    N_TOKENS,
    PROMPTS,
    ParityResult,
    arithmetic_of,
    backend_version,
    cache_dir,
    cached_result,
    model_key,
    reference_for,
    result_path,
    run_gate,
)

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def files():
    return open_model(MODEL)


def test_the_reference_is_the_float_model(files, exact_engine) -> None:
    """The reference's greedy tokens and logits are the exact native path's (which the parity
    tests check against transformers) on every gate prompt."""
    prompts = [exact_engine.tokenize(p) for p in PROMPTS]
    ref = reference_for(files, prompts, exact_engine.model.context_length)
    assert ref.tokens.shape == (len(PROMPTS), N_TOKENS)
    for i, ids in enumerate(prompts):
        s = exact_engine.new_session()
        try:
            exact_engine.prefill(s, ids)
            assert np.abs(exact_engine.next_token_logits(s) - ref.first[i]).max() < 1e-3
        finally:
            exact_engine.close_session(s)
        got = exact_engine.generate(ids, max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
        assert got.token_ids == ref.tokens[i].tolist()


def test_the_default_backends_pass_and_are_cached(files, engine) -> None:
    result = run_gate(engine, files)
    assert result.passed and result.prompts_equal >= MIN_EQUAL, result
    assert result.backend == "native" and result.arithmetic == engine.decode_kernel
    assert result.max_logit_error <= result.tolerance and result.decode_tok_s > 0
    again = cached_result(model_key(files), "native", "cpu", arithmetic_of(engine))
    assert again == result


def test_an_engine_that_is_not_the_reference_fails_the_gate(tmp_path) -> None:
    """The gate compares what the engine computes with the reference of the files it is given:
    a tiny Llama whose MLP down-projections were replaced by other values fails it, against
    the reference of the original."""
    import gguf
    from families import make_hf_model, rewrite_gguf, to_gguf
    from transformers import AutoTokenizer

    from llama_models import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    make_hf_model(tmp_path / "hf", "llama", tokenizer, hidden_size=256, intermediate_size=512)
    original = to_gguf(tmp_path / "hf", tmp_path / "original.gguf")
    changed = rewrite_gguf(original, tmp_path / "changed.gguf", qtype_of=lambda name, shape: (
        gguf.GGMLQuantizationType.Q4_K if name.endswith("ffn_down.weight") else None))
    engine = create_engine(str(changed), backend="native", threads=2, progress=False)
    try:
        result = run_gate(engine, open_model(str(original)))
    finally:
        engine.close()
    assert not result.passed and "from the reference" in result.reason
    assert result.max_logit_error > result.tolerance


def test_auto_skips_a_failed_backend_and_a_named_one_is_refused(files, monkeypatch) -> None:
    """A failed result in the cache: `auto` passes over that backend to the next that passes;
    asking for it by name is a ParityError that says what to choose."""
    engine = create_engine(MODEL, backend="native", threads=2, progress=False)
    try:
        real = run_gate(engine, files)
    finally:
        engine.close()
    failed = ParityResult(**(real.as_dict() | {"passed": False, "reason": "forged for a test"}))
    path = result_path(real)
    path.write_text(json.dumps(failed.as_dict()))
    try:
        with pytest.raises(ParityError, match="forged for a test.*backend='auto'"):
            create_engine(MODEL, backend="native", threads=2, progress=False)
        chosen = create_engine(MODEL, threads=2, progress=False)
        try:
            assert chosen.model.backend != "native"
            picked = cached_result(model_key(files), chosen.model.backend, "cpu",
                                   arithmetic_of(chosen))
            assert picked is not None and picked.passed
        finally:
            chosen.close()
    finally:
        path.write_text(json.dumps(real.as_dict()))
    again = create_engine(MODEL, threads=2, progress=False)
    try:
        assert again.model.backend == "native"
    finally:
        again.close()


def test_the_parity_command_prints_each_backends_result(tmp_path) -> None:
    """Each backend against the reference, and (the first time) the reference against
    transformers loading the same GGUF."""
    for name in ("native", "mlx"):
        skip = ["--no-transformers"] if name != "native" else []
        r = subprocess.run([sys.executable, "-m", "llama_runtime.cli", "parity", MODEL,
                            "--backend", name, "--json", *skip],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        (row,) = out["results"]
        assert row["backend"] == name and row["passed"] and row["prompts_equal"] >= MIN_EQUAL
        if name == "native":
            assert out["reference_vs_transformers"] < out["reference_tolerance"]
    r = subprocess.run([sys.executable, "-m", "llama_runtime.cli", "parity", MODEL,
                        "--backend", "native", "--no-transformers"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "native" in r.stdout and "yes" in r.stdout, r.stderr
    info = subprocess.run([sys.executable, "-m", "llama_runtime.cli", "info", MODEL, "--json"],
                          capture_output=True, text=True, timeout=600)
    parity = json.loads(info.stdout)["parity"]
    assert any(k.startswith("native cpu") and v.startswith("passed") for k, v in parity.items())
    assert Path(cache_dir()).exists()


def test_auto_ranks_proven_backends_by_probe_and_tries_an_accelerator_first(files) -> None:
    """docs/architecture.md's rule, on the registry's entries: with nothing proven, a backend
    that runs an accelerator present here (MLX on Apple silicon) comes first; a proven backend
    comes before any unproven one, and a later one outranks an earlier only when its probe is
    PROBE_MARGIN faster; a backend whose every result failed is left out."""
    from dataclasses import replace

    from llama_runtime import PROBE_MARGIN, _ranked
    from llama_runtime.backend import entry
    from llama_runtime.parity import _store

    native, torch_entry, mlx_entry = (entry(n) for n in ("native", "torch", "mlx"))
    mac_mlx = replace(mlx_entry, accelerated=lambda: True)
    key = "test-" + model_key(files)
    assert [e.name for e in _ranked([native, torch_entry, mac_mlx], key, "auto")] == \
        ["mlx", "native", "torch"]
    assert [e.name for e in _ranked([native, torch_entry, mac_mlx], key, "cpu")] == \
        ["native", "torch", "mlx"]

    def result(backend: str, speed: float, passed: bool = True) -> None:
        _store(ParityResult(
            model=MODEL, fingerprint=key, backend=backend, device="cpu", dtype="float32",
            arithmetic="x", kv_dtype="float32", version=backend_version(backend),
            passed=passed, max_logit_error=0.0, tolerance=0.01, prompts_equal=6, prompts=6,
            decode_tok_s=speed))

    def order() -> list[str]:
        return [e.name for e in _ranked([native, torch_entry, mac_mlx], key, "auto")]

    result("torch", 100.0)
    assert order() == ["torch", "mlx", "native"]  # proven first, then the accelerator
    result("native", 100.0 * PROBE_MARGIN * 0.99)  # faster, but within the probe's spread
    assert order() == ["native", "torch", "mlx"]
    result("mlx", 100.0 * PROBE_MARGIN * 1.5)
    assert order() == ["mlx", "native", "torch"]
    result("mlx", 0.0, passed=False)  # the same key: replaces its pass
    assert order() == ["native", "torch"]
    result("mlx", 100.0 * PROBE_MARGIN * 1.5)
    assert [e.name for e in _ranked([native, torch_entry, mac_mlx], key, "auto")] == \
        ["mlx", "native", "torch"]
    result("mlx", 0.0, passed=False)  # the same key: replaces its pass
    assert [e.name for e in _ranked([native, torch_entry, mac_mlx], key, "auto")] == \
        ["native", "torch"]


def test_a_reference_too_big_for_memory_is_refused_with_the_way_out(files, monkeypatch,
                                                                     tmp_path) -> None:
    """The float32 reference needs 4 bytes a parameter: past 80% of the available memory the
    gate refuses (typed, naming the way out) instead of starting a child the OS would kill."""
    import llama_runtime.loading as loading

    monkeypatch.setenv("LLAMA_ENGINE_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(loading, "host_available_memory", lambda: 64 << 20)
    with pytest.raises(ParityError, match="GiB is available; choose a backend by name"):
        reference_for(files, [[1, 2, 3]], files.config.context_length)
    assert not list(tmp_path.rglob("*.npz"))
