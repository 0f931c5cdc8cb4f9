"""Adapter tests run on the real default model: the session `engine` fixture (tests/conftest.py)
for generation, `embed_engine` for embeddings. `async def` tests run under pytest-asyncio
(asyncio_mode = "auto" in pyproject.toml)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embed_engine():
    """One engine that generates (SmolLM2-135M) and embeds (all-MiniLM-L6-v2)."""
    from llama_runtime import create_engine

    return create_engine("smollm2-135m-instruct", embed_model="all-minilm-l6-v2", threads=2,
                         progress=False, kv_memory="256MiB")
