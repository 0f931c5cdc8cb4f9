"""`ChatLlamaEngine` and `LlamaEngineEmbeddings` against langchain-tests' standard suites, on the
real default model (SmolLM2-135M-Instruct) and embedder (all-MiniLM-L6-v2).

The suites skip some tests by themselves, for features this adapter does not claim: image,
audio, PDF and Anthropic-style inputs (the models read text), a per-call `model` override (one
engine holds one model), serialization (the chat model wraps a live engine), initialisation
from environment variables, and VCR recordings (there is no HTTP to record). Tool calling and
structured output (every method, JSON mode included) run.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import (
    ChatModelIntegrationTests,
    EmbeddingsIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests

from adapters.langchain import ChatLlamaEngine, LlamaEngineEmbeddings


class _Chat:
    """Every test builds its model from `chat_model_params`; all share the session engine."""

    @pytest.fixture(autouse=True)
    def _shared_engine(self, engine: Any) -> None:
        self._engine = engine

    @property
    def chat_model_class(self) -> type[ChatLlamaEngine]:
        return ChatLlamaEngine

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine}

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine holds one model; a ChatLlamaEngine cannot switch per call


class TestChatLlamaEngineUnit(_Chat, ChatModelUnitTests):
    pass


class TestChatLlamaEngineIntegration(_Chat, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short greedy replies keep the suite fast on two CPU cores (a joke's JSON needs a few
        # dozen tokens).
        return {**super().chat_model_params, "temperature": 0, "max_tokens": 64}

    @property
    def supports_json_mode(self) -> bool:
        return True

    # A quality test: with tool_choice left to the model, SmolLM2-135M answers "What is the
    # weather in San Francisco?" from its own knowledge instead of calling get_weather. Calls the
    # caller requires (tool_choice="any" or a name: test_tool_calling, test_tool_choice,
    # structured output) are constrained to the tool's schema and pass.
    @pytest.mark.xfail(reason="a 135M model does not choose to call a tool on its own")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)


class _Embeddings:
    @pytest.fixture(autouse=True)
    def _shared_engine(self, embed_engine: Any) -> None:
        self._engine = embed_engine

    @property
    def embeddings_class(self) -> type[LlamaEngineEmbeddings]:
        return LlamaEngineEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine}


class TestLlamaEngineEmbeddingsUnit(_Embeddings, EmbeddingsUnitTests):
    pass


class TestLlamaEngineEmbeddingsIntegration(_Embeddings, EmbeddingsIntegrationTests):
    pass
