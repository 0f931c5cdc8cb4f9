"""`adapters.llama_index` on the real default model and embedder, and the RAG example over the
project's own docs."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from llama_index.core.llms import ChatMessage

from adapters.llama_index import LlamaEngineEmbedding, LlamaEngineLLM
from llama_engine import UnsupportedOperationError

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [ChatMessage(role="user", content="Name a colour.")]


@pytest.fixture(scope="module")
def llm(exact_engine: Any) -> LlamaEngineLLM:
    # The exact decode path, so that greedy replies to the same prompt agree across calls
    # (the default path quantizes activations: it may flip a near-tie when the prefix cache
    # changes what is computed).
    return LlamaEngineLLM(engine=exact_engine, max_tokens=10, temperature=0)


def test_metadata_describes_the_loaded_model(llm: LlamaEngineLLM, exact_engine: Any) -> None:
    engine = exact_engine
    meta = llm.metadata
    assert meta.context_window == engine.model.context_length
    assert meta.num_output == 10 and meta.is_chat_model and meta.model_name == engine.model.name
    assert LlamaEngineLLM(engine=engine, context_window=512).metadata.context_window == 512


def test_chat_and_complete_sync_stream_and_async_agree(llm: LlamaEngineLLM) -> None:
    chat = llm.chat(QUESTION)
    assert chat.message.content and chat.additional_kwargs["completion_tokens"] <= 10
    streamed = list(llm.stream_chat(QUESTION))
    assert "".join(r.delta for r in streamed) == streamed[-1].message.content == (
        chat.message.content)

    done = llm.complete("The capital of France is")
    assert done.text == "".join(r.delta for r in llm.stream_complete("The capital of France is"))
    assert llm.complete("Paris is the capital of", formatted=True).text  # no completion_to_prompt

    async def run() -> tuple[str, str, str, str]:
        achat = await llm.achat(QUESTION)
        acomplete = await llm.acomplete("The capital of France is")
        astream_chat = "".join([r.delta async for r in await llm.astream_chat(QUESTION)])
        astream = "".join([r.delta async for r in await llm.astream_complete(
            "The capital of France is")])
        return achat.message.content, acomplete.text, astream_chat, astream

    assert asyncio.run(run()) == (chat.message.content, done.text, chat.message.content,
                                  done.text)


def test_non_text_blocks_are_refused(llm: LlamaEngineLLM) -> None:
    from llama_index.core.base.llms.types import ImageBlock

    message = ChatMessage(role="user", blocks=[ImageBlock(url="http://example.com/cat.png")])
    with pytest.raises(UnsupportedOperationError, match="read text only"):
        llm.chat([message])


def test_embedding_sync_async_and_batched_match_the_engine(embed_engine: Any) -> None:
    texts = ["The cat sat on the mat.", "Stocks fell sharply.", "A kitten is on the rug.",
             "Rain is expected tomorrow.", "Bonds rallied."]
    model = LlamaEngineEmbedding(engine=embed_engine, embed_batch_size=2)
    want = embed_engine.embed(texts)
    got = model.get_text_embedding_batch(texts)
    assert len(got) == len(texts) and all(len(v) == 384 for v in got)
    for a, b in zip(got, want, strict=True):
        assert math.isclose(_cosine(a, b), 1.0, abs_tol=1e-5)
    assert math.isclose(_cosine(model.get_query_embedding(texts[0]), want[0]), 1, abs_tol=1e-5)

    async def run() -> list[list[float]]:
        return [await model.aget_query_embedding(texts[1]),
                await model.aget_text_embedding(texts[2]),
                *await model.aget_text_embedding_batch(texts[3:])]

    for a, b in zip(asyncio.run(run()), want[1:], strict=True):
        assert math.isclose(_cosine(a, b), 1.0, abs_tol=1e-5)
    # the embedder is a real one: the paraphrase is closer than the unrelated sentence
    assert _cosine(want[0], want[2]) > _cosine(want[0], want[1]) + 0.2


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# -- the RAG example ----------------------------------------------------------------------------
def _load_example(name: str) -> ModuleType:
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rag() -> ModuleType:
    return _load_example("rag")


@pytest.fixture(scope="module")
def index(rag: ModuleType, embed_engine: Any) -> Any:
    return rag.build_index(embed_engine, rag.load_documents())


RETRIEVAL = [
    ("How do I install the model packages and run pytest?", "README.md"),
    ("What prefill tok/s, TTFT, decode tok/s and peak RSS does each engine reach in the "
     "benchmark table?", "docs/performance.md"),
    ("When no KV block is free, which cached block is evicted?", "docs/architecture.md"),
    ("Where does decode time go according to the torch profiler?", "docs/performance.md"),
    ("How does the scheduler thread batch decoding requests and prefill chunks?",
     "docs/architecture.md"),
    ("How are stop strings matched across token boundaries?", "docs/architecture.md"),
    ("How much faster is continuous batching with many concurrent sessions?",
     "docs/performance.md"),
    ("How does the forced-call writer use logit_bias to write a tool call?",
     "docs/architecture.md"),
    ("What do the fuzz and chaos suites check?", "docs/reliability.md"),
]


def test_rag_indexes_the_project_docs(rag: ModuleType, index: Any) -> None:
    names = {d.metadata["file_name"] for d in rag.load_documents()}
    assert {"README.md", "docs/architecture.md", "docs/performance.md"} <= names
    assert len(index.docstore.docs) > len(names)  # split into chunks


@pytest.mark.parametrize(("question", "document"), RETRIEVAL)
def test_rag_retrieves_the_right_document(index: Any, question: str, document: str) -> None:
    (best,) = index.as_retriever(similarity_top_k=1).retrieve(question)
    assert best.node.metadata["file_name"] == document


def test_rag_query_engine_streams_an_answer_from_the_sources(
    rag: ModuleType, index: Any, embed_engine: Any
) -> None:
    engine = rag.query_engine(embed_engine, index, max_tokens=16, top_k=1)
    response = engine.query(RETRIEVAL[2][0])
    tokens = list(response.response_gen)
    assert len([t for t in tokens if t]) > 1 and "".join(tokens).strip()
    assert response.source_nodes[0].node.metadata["file_name"] == RETRIEVAL[2][1]


@pytest.mark.slow
def test_four_rag_queries_at_once(rag: ModuleType, index: Any, embed_engine: Any) -> None:
    llm = LlamaEngineLLM(engine=embed_engine, max_tokens=8, temperature=0)
    engine = index.as_query_engine(llm=llm, similarity_top_k=1)
    questions = [q for q, _ in RETRIEVAL[:4]]

    async def run() -> list[Any]:
        return await asyncio.gather(*(engine.aquery(q) for q in questions))

    answers = asyncio.run(run())
    for (_, document), answer in zip(RETRIEVAL[:4], answers, strict=True):
        assert str(answer).strip()
        assert answer.source_nodes[0].node.metadata["file_name"] == document
