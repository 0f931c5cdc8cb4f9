"""Building adapters (adapters._shared): every adapter class refuses keywords it does not know,
takes every SamplingParams field, builds from a model name alone, and adapters naming the same
model and engine options share one engine in the process, on the real default model and
embedder."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.llms import ChatMessage

from adapters._shared import shared_engine
from adapters.langchain import ChatLlamaEngine, LlamaEngineEmbeddings
from adapters.langgraph import chat_node
from adapters.llama_index import LlamaEngineEmbedding, LlamaEngineLLM
from llama_engine import InvalidParamsError, ModelNotFoundError

MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"


# -- unknown keywords ---------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "bad", "hint"), [
    (ChatLlamaEngine, "temprature", "temperature"),
    (LlamaEngineLLM, "temprature", "temperature"),
    (LlamaEngineLLM, "max_token", "max_tokens"),
    (LlamaEngineEmbeddings, "batchsize", "batch_size"),
    (LlamaEngineEmbedding, "embed_batchsize", "embed_batch_size"),
])
def test_unknown_keywords_are_refused_naming_the_allowed_ones(
    build: Callable[..., Any], bad: str, hint: str, embed_engine: Any
) -> None:
    name = build.__name__
    with pytest.raises(InvalidParamsError, match=rf"unknown {name} keyword argument\(s\) "
                                                 rf"{bad} \(did you mean {hint}\?\); allowed: "):
        build(engine=embed_engine, **{bad: 0})
    with pytest.raises(InvalidParamsError) as error:
        build(engine=embed_engine, no_such_option=1)
    allowed = str(error.value).split("allowed: ")[1].split(", ")
    assert {"engine", "engine_options", hint} <= set(allowed)
    # checked before any model is loaded
    with pytest.raises(InvalidParamsError, match="no_such_option"):
        build(no_such_option=1, engine_options={"threads": 1})


def test_chat_node_options_are_checked_the_same_way(engine: Any) -> None:
    with pytest.raises(InvalidParamsError,
                       match=r"unknown chat_node option\(s\) temprature \(did you mean "
                             r"temperature\?\); allowed: .*top_k.*typical_p"):
        chat_node(engine, temprature=0)
    with pytest.raises(InvalidParamsError, match=r"option\(s\) engine_options"):
        chat_node(engine, engine_options={"threads": 1})
    chat_node(engine, typical_p=0.9, max_tokens=4)  # any SamplingParams field is an option


def test_every_sampling_field_is_a_keyword(exact_engine: Any) -> None:
    chat = ChatLlamaEngine(engine=exact_engine, top_k=3, typical_p=0.9, ignore_eos=True)
    assert chat.top_k == 3 and chat.sampling == {"typical_p": 0.9, "ignore_eos": True}
    llm = LlamaEngineLLM(engine=exact_engine, top_k=5, min_p=0.1, stop=["\n"],
                         presence_penalty=0.5)
    assert (llm.top_k, llm.min_p, llm.stop) == (5, 0.1, ["\n"])
    assert llm.sampling == {"presence_penalty": 0.5}
    with pytest.raises(InvalidParamsError, match="both as a keyword and in sampling="):
        LlamaEngineLLM(engine=exact_engine, typical_p=0.9, sampling={"typical_p": 0.5})
    with pytest.raises(InvalidParamsError, match="top_k must be"):
        LlamaEngineLLM(engine=exact_engine, top_k=-1)


def test_llm_top_k_reaches_the_sampler(exact_engine: Any) -> None:
    # top_k=1 leaves one candidate, so even a hot temperature with any seed is greedy; had the
    # keyword been dropped, temperature 1.5 would sample at top-k 40.
    prompt = "Once upon a time, in a land far away,"
    greedy = LlamaEngineLLM(engine=exact_engine, temperature=0, max_tokens=12).complete(prompt)
    for seed in (1, 2):
        hot = LlamaEngineLLM(engine=exact_engine, top_k=1, temperature=1.5, seed=seed,
                             max_tokens=12)
        assert hot.complete(prompt).text == greedy.text


def test_engine_options_are_checked(engine: Any) -> None:
    with pytest.raises(InvalidParamsError, match="engine_options apply only when"):
        ChatLlamaEngine(engine=engine, engine_options={"threads": 1})
    with pytest.raises(InvalidParamsError, match="name the model with the adapter's own model="):
        LlamaEngineEmbeddings(engine_options={"embed_model": EMBEDDER})
    with pytest.raises(InvalidParamsError, match="not a plain value"):
        shared_engine(MODEL, options={"threads": [1]})
    with pytest.raises(InvalidParamsError, match="unknown option"):  # create_engine's own check
        LlamaEngineLLM(model=MODEL, engine_options={"thread": 1})
    with pytest.raises(ModelNotFoundError, match="unknown model name"):
        LlamaEngineEmbedding(model_name="no-such-embedder")


# -- building from a model name, one engine per model -------------------------------------------
def test_generating_adapters_build_from_model_alone_and_share_one_engine() -> None:
    chat = ChatLlamaEngine(model=MODEL)
    greedy_chat = ChatLlamaEngine(model=MODEL, temperature=0, max_tokens=6)
    llm = LlamaEngineLLM(model=MODEL, temperature=0, max_tokens=6)
    assert chat.engine is greedy_chat.engine is llm.engine  # one model loaded, not three
    assert chat.model == llm.model == MODEL and llm.metadata.model_name == MODEL

    reply = greedy_chat.invoke([HumanMessage("Name a colour.")])
    assert reply.content and 0 < reply.usage_metadata["output_tokens"] <= 6
    done = llm.chat([ChatMessage(role="user", content="Name a colour.")])
    assert done.message.content and done.additional_kwargs["completion_tokens"] <= 6
    assert llm.complete("The capital of France is").text


def test_embedding_adapters_build_from_model_alone_and_share_one_engine() -> None:
    langchain = LlamaEngineEmbeddings(model=EMBEDDER)
    llama_index = LlamaEngineEmbedding(model_name=EMBEDDER)
    default = LlamaEngineEmbedding()
    assert langchain.engine is llama_index.engine is default.engine
    assert default.model_name == EMBEDDER and LlamaEngineEmbeddings().model == EMBEDDER

    texts = ["The cat sat on the mat.", "A kitten is on the rug.", "Stocks fell sharply."]
    a = langchain.embed_documents(texts)
    b = llama_index.get_text_embedding_batch(texts)
    assert all(len(v) == 384 for v in a)
    assert all(math.isclose(_cosine(x, y), 1.0, abs_tol=1e-5) for x, y in zip(a, b, strict=True))
    assert _cosine(a[0], a[1]) > _cosine(a[0], a[2])  # the kitten is nearer than the stocks


def test_other_options_get_another_engine_which_goes_when_unused() -> None:
    first = LlamaEngineEmbeddings(model=EMBEDDER, engine_options={"threads": 1})
    second = LlamaEngineEmbedding(model_name=EMBEDDER, engine_options={"threads": 1})
    assert first.engine is second.engine
    assert first.engine is not LlamaEngineEmbeddings(model=EMBEDDER).engine  # other options
    assert len(first.embed_query("hello")) == 384
    ref = weakref.ref(first.engine)
    del first, second
    gc.collect()
    assert ref() is None  # held weakly: nobody uses it, so it was freed
    again = LlamaEngineEmbeddings(model=EMBEDDER, engine_options={"threads": 1})
    assert len(again.embed_query("hello")) == 384  # and a new one is built on demand


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
