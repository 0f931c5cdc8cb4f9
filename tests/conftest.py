"""Shared fixtures: the real default model, loaded once per test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def engine():
    from llama_runtime import create_engine

    return create_engine("smollm2-135m-instruct", threads=2, progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from llama_models import resolve_model_path

    return str(resolve_model_path("smollm2-135m-instruct"))
