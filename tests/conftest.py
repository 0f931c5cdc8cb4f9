"""Shared fixtures: the real default model, loaded once per test run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# parity results and references of this run only: never the developer's cache (a test forges a
# failed result), and every gate really runs
_CACHE = tempfile.mkdtemp(prefix="llama-engine-tests-")
os.environ["LLAMA_ENGINE_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def engine():
    from llama_runtime import create_engine

    return create_engine("smollm2-135m-instruct", threads=2, progress=False)


@pytest.fixture(scope="session")
def torch_cpu_engine():
    """The default model on the torch backend's CPU path (the default engine is the native
    backend, which runs the same fused step without torch)."""
    from llama_runtime import create_engine

    return create_engine("smollm2-135m-instruct", backend="torch", threads=2, progress=False)


@pytest.fixture(scope="session")
def exact_engine():
    """The default model with the exact decode kernel: the reference's arithmetic up to
    summation order (the default engine computes prompts the same way, but quantizes the
    activations of generated tokens to 16-bit integers per 32-block, ~0.002% relative error per
    product: the same greedy tokens on the prompts of test_parity.py, but not the same bits)."""
    from llama_runtime import create_engine

    return create_engine("smollm2-135m-instruct", threads=2, progress=False, decode="exact")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from llama_models import resolve_model_path

    return str(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def hf_greedy():
    """transformers' greedy tokens, step by step (`generate(min_new_tokens=...)` would mask EOS,
    which our ignore_eos does not)."""
    import torch

    def run(model, ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < n:
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                            use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
        return tokens

    return run
