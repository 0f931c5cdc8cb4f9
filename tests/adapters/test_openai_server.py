"""The OpenAI-compatible server, driven by the official `openai` client (sync and async), raw
HTTP for what a client would not send, and LangChain's `ChatOpenAI` and LlamaIndex's
`OpenAILike` pointed at it; on the real default model, on 127.0.0.1 and a free port."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from serving import free_port, serving

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name a colour."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}


@pytest.fixture(scope="module")
def base_url(embed_engine: Any) -> Iterator[str]:
    with serving(embed_engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def _health(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/health").json()


def _idle(base_url: str, used_before: int, timeout: float = 10.0) -> dict[str, Any]:
    """/health once nothing runs and the KV blocks are back where they were."""
    deadline = time.monotonic() + timeout
    while True:
        h = _health(base_url)
        if h["requests_running"] == 0 and h["requests_waiting"] == 0 and (
                h["kv_blocks_used"] <= used_before) and h["requests_admitted"] == 0:
            return h
        assert time.monotonic() < deadline, f"the server did not go idle: {h}"
        time.sleep(0.05)


# -- the official client ------------------------------------------------------------------------
def test_chat_streamed_and_whole_agree_and_report_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                           max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again


def test_completions_n_logprobs_echo_and_seed(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt=["The sky is", "Grass is"],
                                     max_tokens=5, temperature=0.9, seed=3, n=2, logprobs=2,
                                     echo=True)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text.startswith("The sky is")
    assert done.choices[2].text.startswith("Grass is")
    lp = done.choices[1].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 5
    again = client.completions.create(model=MODEL, prompt=["The sky is", "Grass is"],
                                      max_tokens=5, temperature=0.9, seed=3, n=2, echo=True)
    assert [c.text for c in again.choices] == [c.text for c in done.choices]  # seeded
    assert done.usage.prompt_tokens == 2 * (done.usage.prompt_tokens // 2)  # counted once each
    streamed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5,
                                         temperature=0, stream=True)
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5,
                                      temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_n_choices_share_the_prompts_kv_blocks(client: openai.OpenAI, base_url: str) -> None:
    prompt = "Once upon a time, " + " ".join(f"a fox named Fox{i} ran." for i in range(20))
    before = _health(base_url)["prefix_cache_hit_tokens"]
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=3,
                                     temperature=1.0, seed=7)
    assert len(done.choices) == 3 and done.usage.completion_tokens == 12
    shared = _health(base_url)["prefix_cache_hit_tokens"] - before
    block = _health(base_url)["kv_block_size"]
    # choices 1 and 2 found choice 0's full prompt blocks in the cache
    assert shared >= 2 * block * ((done.usage.prompt_tokens - 1) // block)


def test_chat_logprobs_and_extensions(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True})
    content = done.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_embeddings_float_and_base64(client: openai.OpenAI, embed_engine: Any) -> None:
    texts = ["A cat sits on the mat.", "Stocks fell today."]
    done = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # base64 on the wire
    assert [d.index for d in done.data] == [0, 1] and done.usage.prompt_tokens > 0
    want = embed_engine.embed(texts)
    for got, ref in zip(done.data, want, strict=True):
        assert max(abs(a - b) for a, b in zip(got.embedding, ref, strict=True)) < 1e-6
    floats = client.embeddings.create(model="all-minilm-l6-v2", input="A cat.",
                                      encoding_format="float")
    assert len(floats.data[0].embedding) == 384


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, "all-minilm-l6-v2"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_tools_whole_and_streamed(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    done = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],
                                          tool_choice="required", temperature=0, max_tokens=48)
    (call,) = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and call.type == "function"
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    deltas = [c.choices[0].delta for c in client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], stream=True, temperature=0, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}) if c.choices]
    streamed = [t for d in deltas for t in d.tool_calls or ()]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == [
        (0, "get_weather", call.function.arguments)]
    history = [*ask, done.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                            temperature=0, max_tokens=16)
    assert answer.choices[0].message.role == "assistant"


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=24)
    population: int = Field(ge=0, le=50_000_000)


def test_response_format(client: openai.OpenAI) -> None:
    parsed = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=64)
    assert isinstance(parsed.choices[0].message.parsed, City)
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris as JSON."}], temperature=0,
        max_tokens=48, response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_async_client_streams_and_awaits(base_url: str) -> None:
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
        whole = await client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                                     max_tokens=8)
        stream = await client.chat.completions.create(model=MODEL, messages=ASK,
                                                      temperature=0, max_tokens=8, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content or "", text

    whole, streamed = asyncio.run(run())
    assert whole == streamed


# -- under load ---------------------------------------------------------------------------------
def test_sixteen_streaming_clients_each_get_their_solo_greedy_reply(
        client: openai.OpenAI, base_url: str) -> None:
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def solo(p: str) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                           temperature=0, max_tokens=24)
        return r.choices[0].message.content or ""

    alone = [solo(p) for p in prompts]
    got: list[str | None] = [None] * 16
    peak = [0]
    barrier = threading.Barrier(16)

    def streamed(i: int) -> None:
        barrier.wait()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompts[i]}], temperature=0,
            max_tokens=24, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def watch() -> None:  # and send bad requests meanwhile: they must not disturb the others
        bad = [{"model": MODEL, "messages": ASK, "temperature": -1},
               {"model": MODEL, "messages": ASK, "response_format": {"type": "regex",
                                                                     "pattern": "("}},
               {"model": "nope", "messages": ASK}]
        k = 0
        while any(g is None for g in got):
            peak[0] = max(peak[0], _health(base_url)["requests_running"])
            r = httpx.post(f"{base_url}/v1/chat/completions", json=bad[k % len(bad)])
            assert 400 <= r.status_code < 500
            k += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=streamed, args=(i,)) for i in range(16)]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    for t in [*threads, watcher]:
        t.join(timeout=300)
    assert got == alone
    assert peak[0] > 4  # batched together, not served one after another


def test_a_client_leaving_mid_stream_or_during_prefill_frees_its_request(
        base_url: str) -> None:
    used = _idle(base_url, 10**9)["kv_blocks_used"]
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4000, "stream": True,
            "temperature": 0.8, "extra": 1, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        seen = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: ") for line in seen)
        assert _health(base_url)["requests_running"] == 1
    _idle(base_url, used)
    long = {**body, "messages": [{"role": "user", "content": "word " * 3000}]}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{base_url}/v1/chat/completions", json=long):
        time.sleep(0.3)  # the prompt is being computed: leave before its first token
    _idle(base_url, used)
    whole = {**body, "stream": False}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=1.0) as http:
        http.post(f"{base_url}/v1/chat/completions", json=whole)  # waits for a whole reply
    _idle(base_url, used)


# -- errors ------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"messages": ASK, "temperature": 5}, 400, "invalid_value"),
    ({"messages": ASK, "n": 0}, 400, "invalid_value"),
    ({"messages": []}, 400, "invalid_value"),
    ({"messages": ASK, "logit_bias": {"x": 1}}, 400, "invalid_value"),
    ({"messages": ASK, "logit_bias": {"99999999": 1}}, 400, "invalid_value"),
    ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "nonsense"}}}}, 400, "invalid_value"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f",
                                                                   "parameters": 3}}]},
     400, "invalid_value"),
    ({"messages": ASK, "tool_choice": "required"}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400,
     "context_length_exceeded"),
    ({"messages": ASK, "model": "gpt-4o"}, 404, "model_not_found"),
])
def test_bad_requests_get_the_right_status(base_url: str, body: dict[str, Any], status: int,
                                           code: str) -> None:
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=30)
    _error(r, status, code)


def test_engine_errors_are_counted_with_their_status(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/chat/completions",
                   json={"model": MODEL, "messages": ASK, "tool_choice": "required"})
    _error(r, 400)
    text = httpx.get(f"{base_url}/metrics").text
    assert 'llama_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    assert 'endpoint="/v1/chat/completions",status="500"' not in text


def test_whole_replies_keep_openais_nulls_and_completions_default_to_16_tokens(
        base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "max_tokens": 48})
    message = r.json()["choices"][0]["message"]
    assert "content" in message and message["content"] is None and message["tool_calls"]
    done = httpx.post(f"{base_url}/v1/completions", json={
        "model": MODEL, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True})
    assert done.json()["usage"]["completion_tokens"] == 16


def test_malformed_and_oversized_bodies(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    _error(r, 400, "invalid_json")
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL,
                                                       "prompt": "x" * (9 << 20)})
    _error(r, 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(9):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/completions", content=chunked(),
                   headers={"content-type": "application/json"})
    _error(r, 413, "request_too_large")
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "n": 16,
                                                       "prompt": ["a"] * 20})
    _error(r, 400, "too_many_generations")
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                       "max_tokens": 100_000})
    _error(r, 400, "context_length_exceeded")
    _error(httpx.post(f"{base_url}/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                         "input": [[1, 2]]}), 400)
    _error(httpx.get(f"{base_url}/v1/nothing"), 404)


def test_an_api_key_is_required_and_compared(embed_engine: Any) -> None:
    with serving(embed_engine, api_key="sekrit") as url:
        _error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        _error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert next(m.id for m in ok.models.list()) == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # open: for load balancers


def test_a_full_queue_answers_429_and_the_others_are_untouched(embed_engine: Any) -> None:
    with serving(embed_engine, max_requests=1) as url:
        body = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0}
        held = {**body, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{url}/v1/chat/completions", json=held) as r:
            lines = r.iter_lines()
            next(lines)
            busy = httpx.post(f"{url}/v1/chat/completions", json=body)
            err = _error(busy, 429, "queue_full")
            assert busy.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and len(rest) > 250  # the held stream went on
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200


def test_metrics_health_tokenize_detokenize(client: openai.OpenAI, base_url: str) -> None:
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    text = httpx.get(f"{base_url}/metrics").text
    for name in ("llama_requests_total", "llama_prompt_tokens_total",
                 "llama_completion_tokens_total", "llama_time_to_first_token_seconds_bucket",
                 "llama_inter_token_latency_seconds_bucket", "llama_requests_waiting",
                 "llama_kv_blocks_used"):
        assert name in text, name
    assert 'llama_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    tokens = httpx.post(f"{base_url}/tokenize", json={"content": "Hello world"}).json()
    assert httpx.post(f"{base_url}/detokenize", json=tokens).json()["content"] == "Hello world"
    assert _health(base_url)["status"] == "ok"


# -- the frameworks' OpenAI clients -------------------------------------------------------------
def test_langchain_chat_openai(base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=f"{base_url}/v1", api_key="x", temperature=0,
                      max_tokens=12, max_retries=0)
    reply = chat.invoke("Name a colour.")
    assert reply.content and reply.usage_metadata["output_tokens"] > 0
    assert "".join(c.content for c in chat.stream("Name a colour.")) == reply.content
    roomy = ChatOpenAI(model=MODEL, base_url=f"{base_url}/v1", api_key="x", temperature=0,
                       max_tokens=64, max_retries=0)
    call = roomy.bind_tools([WEATHER], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert call.tool_calls[0]["name"] == "get_weather"
    city = roomy.with_structured_output(City, method="json_schema").invoke(
        "Describe Paris as JSON.")
    assert isinstance(city, City)


def test_llama_index_openai_like(base_url: str) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=MODEL, api_base=f"{base_url}/v1", api_key="x", is_chat_model=True,
                     temperature=0, max_tokens=12, max_retries=0)
    reply = llm.chat([ChatMessage(role="user", content="Name a colour.")])
    assert reply.message.content
    streamed = "".join(r.delta or "" for r in llm.stream_chat(
        [ChatMessage(role="user", content="Name a colour.")]))
    assert streamed == reply.message.content
    assert llm.complete("The sky is").text


@pytest.mark.slow
def test_llama_engine_serve_from_the_shell() -> None:
    port = free_port()
    exe = shutil.which("llama-engine")
    cmd = [exe] if exe else [sys.executable, "-m", "llama_runtime.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port), "--api-key", "k",
                             "--threads", "1", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama-engine serve did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                               temperature=0)
        assert reply.choices[0].message.content
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key is required
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal: the conventional exit status
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert f"serving {MODEL} on http://127.0.0.1:{port}/v1 (API key required)" in err
