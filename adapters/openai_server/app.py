"""The OpenAI-compatible HTTP server over a `LlamaEngine`: `create_app(engine)` is a FastAPI app.

Every request becomes one engine request per choice (`stream_chat` or `stream`), so requests
from many clients are batched by the engine's scheduler; nothing here holds a lock across a
generation. The server admits at most `max_requests` requests at once and answers 429 with
`Retry-After` past that, rather than queueing without bound. A client that goes away (mid-stream,
during prefill too, or while waiting for a whole reply) has its generation cancelled and its KV
blocks freed within one step. Errors are OpenAI's error object with the right status
(`adapters.openai_server.errors`); bad input is never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.openai_server.errors import APIError, error_response, from_exception
from adapters.openai_server.metrics import Metrics
from adapters.openai_server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionRequest,
    Delta,
    DetokenizeRequest,
    EmbeddingRequest,
    FunctionCall,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TokenizeRequest,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from llama_engine import (
    InvalidToolCall,
    LlamaEngine,
    LlamaError,
    SamplingParams,
    StreamChunk,
    TokenStream,
    ToolCall,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_REQUESTS", "create_app"]

DEFAULT_MAX_REQUESTS = 128
"""Requests admitted at once (running or waiting in the engine); past it, 429."""
DEFAULT_MAX_BODY_BYTES = 8 << 20
"""Largest request body; past it, 413."""
COMPLETION_MAX_TOKENS = 16
"""/v1/completions' max_tokens when a request gives none (OpenAI's default); chat replies run
to their end or the context's."""
_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="llama-server")
"""Where requests' blocking work runs (opening streams, embedding, stats, tokenizing), apart
from asyncio's default pool (cores + 4 threads), so a few long embeddings cannot hold up new
requests and health checks."""
_DISCONNECT_POLL_S = 0.1
SEND_TIMEOUT_S = 30.0
"""A streaming client that reads nothing for this long is dropped (its request freed)."""
_T = TypeVar("_T")


def create_app(
    engine: LlamaEngine,
    *,
    api_key: str | None = None,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving `engine` (see docs/server.md).

    `api_key`: requests to /v1/*, /tokenize and /detokenize must carry `Authorization: Bearer
    <api_key>` (/health and /metrics stay open). `max_requests`: how many requests are admitted
    at once before 429. `max_body_bytes`: the largest request body before 413.
    """
    if max_requests < 1 or max_body_bytes < 1:
        raise ValueError("max_requests and max_body_bytes must be >= 1")
    server = _Server(engine, max_requests=max_requests)
    app = FastAPI(title="llama-engine", version="1", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes,
                       metrics=server.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return error_response(_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        code = {404: "not_found", 413: "request_too_large"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), type=kind, code=code))

    @app.exception_handler(LlamaError)
    async def _engine_error(request: Request, e: LlamaError) -> Response:
        return error_response(from_exception(e))

    @app.exception_handler(Exception)
    async def _other(request: Request, e: Exception) -> Response:
        return error_response(from_exception(e))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = await _blocking(engine.stats)
        return {"status": "ok", "model": server.model_id, "requests_admitted": server.admitted,
                **stats}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await _blocking(server.metrics.text)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "llama-engine"}
            for name in server.listed_models()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in server.listed_models():
            server.check_model(model_id)
        return {"id": model_id, "object": "model", "created": server.created,
                "owned_by": "llama-engine"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.complete(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        return await server.embed(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            tokens = engine.tokenize(body.content, add_special=body.add_special)
            if not body.with_pieces:
                return {"tokens": tokens}
            return {"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in tokens]}

        return await _blocking(run)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return {"content": await _blocking(engine.detokenize, body.tokens)}

    return app


# -- the guard: body size, API key, request counts ------------------------------------------------
class _Guard:
    """Pure ASGI middleware (it must not buffer streamed responses): refuses bodies over the
    limit (413), checks the API key in constant time (401), and counts responses by endpoint and
    status for /metrics."""

    _OPEN = ("/health", "/metrics")

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 metrics: Metrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = 500

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status = refusal.status
                await error_response(refusal)(scope, receive, send)
                return
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.metrics.requests.labels(endpoint=_endpoint(path), status=str(status)).inc()

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        if self.api_key is not None and scope["path"] not in self._OPEN:
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                return APIError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                "<key>' with the key the server was started with",
                                type="invalid_request_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # an HTTPException: FastAPI passes it on from the body read
                    raise StarletteHTTPException(413, _too_large(limit).message)
            return message

        return limited


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit:,} bytes; send a smaller one",
                    code="request_too_large")


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
             "/health", "/metrics", "/tokenize", "/detokenize")
    return next((k for k in known if path == k or path.startswith(k + "/")), "other")


def _validation_error(e: RequestValidationError) -> APIError:
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', first.get('msg', ''))}",
                        code="invalid_json")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                    param=where or None, code="invalid_value")


# -- serving ------------------------------------------------------------------------------------
@dataclass
class _Choice:
    """One choice's reply as it accumulates."""

    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidToolCall] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, chunk: StreamChunk) -> None:
        self.text.append(chunk.text)
        self.tool_calls += chunk.tool_calls or ()
        self.invalid += chunk.invalid_tool_calls or ()
        if chunk.token_id is not None and chunk.logprob is not None:
            self.logprobs.append((chunk.token_id, chunk.logprob, chunk.top_logprobs or {}))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self.prompt_tokens = chunk.usage.prompt_tokens
                self.cached_tokens = chunk.usage.cached_tokens
                self.completion_tokens = chunk.usage.completion_tokens


class _Server:
    def __init__(self, engine: LlamaEngine, *, max_requests: int) -> None:
        self.engine = engine
        self.max_requests = max_requests
        self.admitted = 0
        self.created = int(time.time())
        self.metrics = Metrics(engine.stats, lambda: self.admitted)
        handle = engine.model
        self.model_id = handle.name
        path = handle.path
        base = os.path.basename(path.rstrip("/"))
        self._names = {handle.name, path, base, os.path.splitext(base)[0]}

    # -- models ---------------------------------------------------------------------------------
    def listed_models(self) -> list[str]:
        names = [self.model_id]
        embed = self.engine.embed_model_name
        if embed and embed != self.model_id:
            names.append(embed)
        return names

    def check_model(self, name: str, *, embedding: bool = False) -> None:
        embed = self.engine.embed_model_name
        if name in self._names or (embedding and embed is not None and name == embed):
            return
        served = ", ".join(self.listed_models())
        raise APIError(404, f"the model {name!r} is not served here; this server serves "
                       f"{served} (GET /v1/models)", type="invalid_request_error",
                       code="model_not_found", param="model")

    # -- admission ------------------------------------------------------------------------------
    def admit(self, generations: int = 1) -> _Ticket:
        """Admit a request that runs `generations` engine requests (choices x prompts)."""
        if generations > self.max_requests:
            raise APIError(400, f"this request asks for {generations} generations (n x "
                           f"prompts), more than the {self.max_requests} the server runs at "
                           "once; split it", param="n", code="too_many_generations")
        if self.admitted + generations > self.max_requests:
            raise APIError(429, f"the server is busy: {self.admitted} generations are in "
                           "progress, the most it takes at once; retry shortly",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        self.admitted += generations
        return _Ticket(self, generations)

    # -- chat -----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        ticket = self.admit(body.n)
        try:
            def open_stream(seed: int | None) -> TokenStream:
                params = _params(body, seed=seed, logprobs=logprobs, max_tokens=max_tokens,
                                 context=self.engine.model.context_length)
                return self.engine.stream_chat(messages, tools=body.tools,
                                               tool_choice=body.tool_choice, params=params)

            streams = await _open(open_stream, body.n, body.seed)
        except BaseException:
            ticket.release()
            raise
        reply = _Reply(self, "chatcmpl", body.model, streams, ticket, arrived=time.perf_counter())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _Streamed(reply.chat_events(include_usage), reply)
        choices = await reply.collect(request)
        return JSONResponse(reply.chat_completion(choices).model_dump())

    # -- text completions -----------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported; send the prompt "
                           "alone", param="suffix", code="unsupported")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported")
        prompts = _prompts(body.prompt)
        ticket = self.admit(body.n * len(prompts))
        try:
            streams: list[TokenStream] = []
            for prompt in prompts:
                def open_stream(seed: int | None, prompt: str | list[int] = prompt
                                ) -> TokenStream:
                    tokens = self.engine.tokenize(prompt) if isinstance(prompt, str) else prompt
                    params = _params(body, seed=seed, logprobs=body.logprobs,
                                     max_tokens=body.max_tokens or COMPLETION_MAX_TOKENS,
                                     context=self.engine.model.context_length,
                                     prompt_tokens=len(tokens))
                    return self.engine.stream(tokens, params=params)

                streams += await _open(open_stream, body.n, body.seed)
            echo = [await _blocking(self._text_of, p) for p in prompts] if body.echo else []
        except BaseException:
            for s in streams:
                s.close()
            ticket.release()
            raise
        reply = _Reply(self, "cmpl", body.model, streams, ticket, arrived=time.perf_counter(),
                       per_prompt=body.n, echo=echo)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _Streamed(reply.text_events(include_usage), reply)
        choices = await reply.collect(request)
        return JSONResponse(reply.text_completion(choices).model_dump())

    def _text_of(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.engine.detokenize(prompt)

    # -- embeddings -----------------------------------------------------------------------------
    async def embed(self, body: EmbeddingRequest) -> dict[str, Any]:
        self.check_model(body.model, embedding=True)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a non-empty list of strings (token "
                           "arrays are not accepted: send the text)", param="input",
                           code="invalid_value")
        ticket = self.admit()
        try:
            vectors = await _blocking(self.engine.embed, texts)
            counts = await _blocking(self.engine.embed_token_counts, texts)
        finally:
            ticket.release()
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise APIError(400, f"dimensions={body.dimensions} is not supported: this model's "
                           f"vectors have {len(vectors[0])}", param="dimensions",
                           code="unsupported")
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float" else base64.b64encode(
                     np.asarray(v, dtype="<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)]
        tokens = sum(counts)
        self.metrics.prompt_tokens.inc(tokens)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class _Streamed(EventSourceResponse):
    """Server-sent events whose request is closed (streams, admission) however the response
    ends, even when the client leaves before the first event is sent."""

    def __init__(self, events: AsyncIterator[str], reply: _Reply) -> None:
        super().__init__(events, ping=15, sep="\n", send_timeout=SEND_TIMEOUT_S)
        self._reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._reply.close()


class _Ticket:
    """An admitted request's generations; released once, when its answer is over."""

    def __init__(self, server: _Server, generations: int) -> None:
        self._server: _Server | None = server
        self._generations = generations

    def release(self) -> None:
        if self._server is not None:
            self._server.admitted -= self._generations
            self._server = None


async def _open(open_stream: Callable[[int | None], TokenStream], n: int,
                seed: int | None) -> list[TokenStream]:
    """The n choices' streams (choice i seeded seed + i), opened in a worker thread: opening
    checks the request (typed errors now, before any answer) and compiles any grammar."""
    def every() -> list[TokenStream]:
        streams: list[TokenStream] = []
        try:
            for i in range(n):
                streams.append(open_stream(None if seed is None else seed + i))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    return await _blocking(every)


async def _blocking(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` on the server's worker pool."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, lambda: fn(*args))


def _params(body: Any, *, seed: int | None, logprobs: int | None, max_tokens: int | None,
            context: int, prompt_tokens: int | None = None) -> SamplingParams:
    """The request's SamplingParams: the fields it set, the engine's defaults for the rest."""
    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                 "min_p", "typical_p", "repetition_penalty", "ignore_eos"):
        value = getattr(body, name)
        if value is not None:
            kw[name] = value
    if seed is not None:
        kw["seed"] = seed
    if body.stop is not None:
        kw["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if body.logit_bias:
        try:
            kw["logit_bias"] = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (as strings, e.g. "
                           "{\"50256\": -100})", param="logit_bias", code="invalid_value"
                           ) from None
    fmt = body.response_format
    if fmt is not None and fmt.get("type") != "text":
        kw["response_format"] = fmt
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if max_tokens is not None:
        if prompt_tokens is not None and prompt_tokens + max_tokens > context:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) and max_tokens "
                           f"({max_tokens}) are over the context of {context} tokens; lower "
                           "max_tokens or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        kw["max_tokens"] = max_tokens
    else:
        kw["max_tokens"] = max(1, context - (prompt_tokens or 0))
    return SamplingParams.from_kwargs(**kw)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


class _Reply:
    """The choices of one request, read together: choice 0 first until its prompt is computed
    (its first token), then the others, which find that prompt's KV blocks in the cache."""

    def __init__(self, server: _Server, kind: str, model: str, streams: list[TokenStream],
                 ticket: _Ticket, *, arrived: float, per_prompt: int | None = None,
                 echo: Sequence[str] = ()) -> None:
        self.server, self.model, self.streams, self.ticket = server, model, streams, ticket
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.arrived = arrived
        self.per_prompt = per_prompt or len(streams)
        self.echo = list(echo)

    async def chunks(self) -> AsyncIterator[tuple[int, StreamChunk]]:
        """(choice index, chunk) as they come, from every choice."""
        if len(self.streams) == 1:  # one choice: read it directly, no fan-in
            try:
                async with aclosing(self._timed(0)) as chunks:
                    async for chunk in chunks:
                        yield 0, chunk
            finally:
                self.close()
            return
        queue: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()
        started: dict[int, asyncio.Event] = {}

        async def read(i: int) -> None:
            leader = i - i % self.per_prompt
            if leader != i:
                await started[leader].wait()
            try:
                async for chunk in self._timed(i):
                    started[i].set()
                    await queue.put((i, chunk))
            except BaseException as e:  # handed to the reader, which raises it
                await queue.put((i, e))
            finally:
                started[i].set()
                await queue.put((i, None))

        for i in range(len(self.streams)):
            started[i] = asyncio.Event()
        tasks = [asyncio.create_task(read(i)) for i in range(len(self.streams))]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            self.close()
            with suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _timed(self, i: int) -> AsyncIterator[StreamChunk]:
        """Choice i's chunks, its first token's time and the gaps between tokens observed."""
        last: float | None = None
        async for chunk in self.streams[i]:
            if chunk.token_id is not None:
                now = time.perf_counter()
                if last is None:
                    self.server.metrics.ttft.observe(now - self.arrived)
                else:
                    self.server.metrics.itl.observe(now - last)
                last = now
            yield chunk

    def close(self) -> None:
        """Stop every choice's generation (freeing its KV) and end the admission; idempotent."""
        for s in self.streams:
            s.close()
        self.ticket.release()

    async def collect(self, request: Request) -> list[_Choice]:
        """Every choice to its end; cancelled (KV freed) if the client goes away first."""
        choices = [_Choice() for _ in self.streams]

        async def run() -> None:
            async for i, chunk in self.chunks():
                choices[i].add(chunk)

        await _until_disconnect(request, run())
        self._count(choices)
        return choices

    def _count(self, choices: Sequence[_Choice]) -> None:
        m = self.server.metrics
        m.prompt_tokens.inc(sum(c.prompt_tokens for c in choices[::self.per_prompt]))
        m.completion_tokens.inc(sum(c.completion_tokens for c in choices))

    def usage(self, choices: Sequence[_Choice]) -> Usage:
        firsts = choices[::self.per_prompt]  # the prompt counts once per prompt, not per choice
        prompt = sum(c.prompt_tokens for c in firsts)
        completion = sum(c.completion_tokens for c in choices)
        cached = sum(c.cached_tokens for c in firsts)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # -- chat -----------------------------------------------------------------------------------
    def chat_completion(self, choices: list[_Choice]) -> ChatCompletion:
        out = []
        for i, c in enumerate(choices):
            calls = [_tool_call(call) for call in c.tool_calls] or None
            text = "".join(c.text)
            out.append(ChatChoice(
                index=i, finish_reason=c.finish_reason,
                message=AssistantMessage(content=text if text or not calls else None,
                                         tool_calls=calls),
                logprobs=self._chat_logprobs(c.logprobs) if c.logprobs else None))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=out,
                              usage=self.usage(choices))

    def chat_events(self, include_usage: bool) -> AsyncIterator[str]:
        choices = [_Choice() for _ in self.streams]
        return self._events(self._chat_deltas(choices), choices, include_usage, lambda usage: (
            ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                usage=usage)))

    async def _chat_deltas(self, choices: list[_Choice]) -> AsyncIterator[str]:
        calls_sent = [0] * len(self.streams)
        yield self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                           for i in range(len(self.streams))])
        async for i, chunk in self.chunks():
            choices[i].add(chunk)
            delta = Delta(content=chunk.text or None)
            if chunk.tool_calls:
                delta.tool_calls = [_tool_call(c, index=calls_sent[i] + k)
                                    for k, c in enumerate(chunk.tool_calls)]
                calls_sent[i] += len(chunk.tool_calls)
            logprobs = (self._chat_logprobs(choices[i].logprobs[-1:])
                        if chunk.logprob is not None else None)
            if delta.content or delta.tool_calls or logprobs or chunk.finish_reason:
                yield self._chunk([ChunkChoice(index=i, delta=delta, logprobs=logprobs,
                                               finish_reason=chunk.finish_reason)])

    async def _events(self, deltas: AsyncIterator[str], choices: list[_Choice],
                      include_usage: bool, usage_chunk: Callable[[Usage], BaseModel]
                      ) -> AsyncIterator[str]:
        """The server-sent events of a stream: its deltas, then the usage chunk if asked for,
        then [DONE]; an error after the status was sent is reported as a last event."""
        try:
            async for event in deltas:
                yield event
            self._count(choices)
            if include_usage:
                yield usage_chunk(self.usage(choices)).model_dump_json()
        except Exception as e:  # the status is sent: report in the stream
            yield json.dumps(from_exception(e).body())
        yield "[DONE]"

    def _chunk(self, choices: list[ChunkChoice]) -> str:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices).model_dump_json()

    def _chat_logprobs(self, items: Sequence[tuple[int, float, dict[int, float]]]
                       ) -> ChoiceLogprobs:
        piece = self.server.engine.detokenize
        content = []
        for token, logprob, top in items:
            text = piece([token])
            content.append(TokenLogprob(
                token=text, logprob=logprob, bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=(t := piece([tid])), logprob=lp,
                                         bytes=list(t.encode())) for tid, lp in top.items()]))
        return ChoiceLogprobs(content=content)

    # -- text completions -----------------------------------------------------------------------
    def text_completion(self, choices: list[_Choice]) -> TextCompletion:
        out = []
        for i, c in enumerate(choices):
            prefix = self.echo[i // self.per_prompt] if self.echo else ""
            out.append(TextChoice(index=i, text=prefix + "".join(c.text),
                                  finish_reason=c.finish_reason,
                                  logprobs=self._text_logprobs(c.logprobs, len(prefix))
                                  if c.logprobs else None))
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=out,
                              usage=self.usage(choices))

    def text_events(self, include_usage: bool) -> AsyncIterator[str]:
        choices = [_Choice() for _ in self.streams]
        return self._events(self._text_deltas(choices), choices, include_usage, lambda usage: (
            TextCompletion(id=self.id, created=self.created, model=self.model, choices=[],
                           usage=usage)))

    async def _text_deltas(self, choices: list[_Choice]) -> AsyncIterator[str]:
        for i, prefix in enumerate(self.echo):
            for j in range(self.per_prompt):
                yield self._text_chunk(i * self.per_prompt + j, prefix, None, None)
        async for i, chunk in self.chunks():
            choices[i].add(chunk)
            if chunk.text or chunk.finish_reason:
                logprobs = (self._text_logprobs(choices[i].logprobs[-1:], 0)
                            if chunk.logprob is not None else None)
                yield self._text_chunk(i, chunk.text, chunk.finish_reason, logprobs)

    def _text_chunk(self, i: int, text: str, finish: str | None,
                    logprobs: TextLogprobs | None) -> str:
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=[
            TextChoice(index=i, text=text, finish_reason=finish, logprobs=logprobs)]
        ).model_dump_json()

    def _text_logprobs(self, items: Sequence[tuple[int, float, dict[int, float]]],
                       offset: int) -> TextLogprobs:
        piece = self.server.engine.detokenize
        tokens, offsets = [], []
        for token, _, _ in items:
            offsets.append(offset)
            tokens.append(text := piece([token]))
            offset += len(text)
        return TextLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in items],
                            top_logprobs=[{piece([t]): lp for t, lp in top.items()}
                                          for _, _, top in items],
                            text_offset=offsets)


def _tool_call(call: ToolCall, *, index: int | None = None) -> ToolCallOut:
    return ToolCallOut(index=index, id=call.id, function=FunctionCall(
        name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)))


async def _until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result, or its cancellation when the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
