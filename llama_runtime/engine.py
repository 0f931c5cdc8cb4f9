"""`Engine`: sessions, the scheduler, token streams, the paged KV cache's bookkeeping, saved
sessions, embeddings and stats, for any backend. It holds one `Backend` (backend.py), which
prepares a model and computes steps; everything a caller sees between load and step is here, so
every backend behaves the same. No torch here."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm import tqdm

from llama_engine import (
    ChatMessage,
    ContextOverflowError,
    EngineClosedError,
    InvalidParamsError,
    InvalidTokenError,
    LlamaEngine,
    ModelHandle,
    ModelSpec,
    PrefillResult,
    SamplingParams,
    Session,
    SessionError,
    StreamChunk,
    TokenStream,
    Usage,
)
from llama_engine.stream import Outbox
from llama_kv import PagedKVCache
from llama_runtime.backend import Backend, KVBudget, KVStore, Prepared
from llama_runtime.compute import COMPUTE_LOCK, DEFAULT_BATCH_SIZE, check_options, check_texts
from llama_runtime.generation import Generation
from llama_runtime.loading import fingerprint, model_handle, open_files
from llama_runtime.scheduler import Request, Scheduler
from llama_sampling.constraint import Grammar

if TYPE_CHECKING:
    from llama_models import ModelFiles
from llama_runtime.session_file import import_kv, read_session, save_kv, saved_slots
from llama_runtime.step import SeqStep
from llama_tokenizer import Tokenizer

__all__ = ["DECODER", "DEFAULT_EMBED_MODEL", "Engine"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"
DECODER = "decoder"
"""embed_model value: embed with the generating model's mean-pooled hidden states."""


_OPEN = "open"
"""Session.backend_state of a session this engine serves (None once closed)."""


class Engine(LlamaEngine):
    """One model on one backend, many sessions. Forward passes are serialised by the
    process-wide compute lock and run on the scheduler's thread, so sessions may be driven from
    any number of threads and asyncio tasks; batching them into one forward per step is the
    scheduler's job."""

    def __init__(self, backend: Backend, *, progress: bool = True, prefill_chunk: int = 512,
                 kv_memory: int | str = "auto", kv_block_size: int = 16, max_batch: int = 32,
                 kv_policy: str = "wait", embed_model: str | None = None) -> None:
        if kv_policy not in ("wait", "fail"):
            raise InvalidParamsError(f"kv_policy must be 'wait' or 'fail', got {kv_policy!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParamsError(f"max_batch must be a positive integer, got {max_batch!r}")
        if prefill_chunk < 1:
            raise InvalidParamsError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self._backend = backend
        self._kv_memory, self._kv_block_size = kv_memory, kv_block_size
        self._max_batch, self._kv_policy = max_batch, kv_policy
        self._prefill_chunk = prefill_chunk
        self._progress = progress
        self._scheduler: Scheduler | None = None
        self._stop_finalizer: weakref.finalize | None = None
        self._closed = False
        self._lock = threading.RLock()
        self._sessions: weakref.WeakValueDictionary[str, Session] = (
            weakref.WeakValueDictionary())
        """The live sessions. Held weakly: a session its caller dropped is freed (its id is
        queued in `_orphans` by a finalizer and freed by `_reap`, under the scheduler lock)."""
        self._orphans: deque[str] = deque()
        self._handle: ModelHandle | None = None
        self._tokenizer: Tokenizer | None = None
        self._weight_paths: dict[str, str] | None = None
        self._ctx = 0
        self._fingerprint = ""
        self._store: KVStore | None = None
        # embeddings: the encoder (loaded on first use unless load_embed_model ran), or
        # embed_model=DECODER for mean-pooled states of the generating model
        self._embed_model = embed_model
        self._embedder: Any = None
        self._embed_load_lock = threading.Lock()
        self._forward_lock = COMPUTE_LOCK  # shared by every engine: see its docstring
        """Held by every forward of the generating model: the scheduler's steps and decoder
        embeddings, so the two never run at once."""

    @property
    def backend(self) -> str:
        """The backend's name (as in ModelHandle.backend)."""
        return self._backend.name

    @property
    def threads(self) -> int:
        """CPU threads a forward uses."""
        return self._backend.threads

    @property
    def decode_kernel(self) -> str:
        """The arithmetic of prompts and generated tokens: "mixed", "int16", "int8" or "exact"
        (the fused native step's modes, library.DECODE_MODES) or "torch" (op by op)."""
        return self._backend.decode_kernel

    # -- loading (the backend) ------------------------------------------------------------------
    def load_model(self, spec: ModelSpec, *, files: ModelFiles | None = None) -> ModelHandle:
        """`files`: the model already opened (create_engine opens it to find its parity
        results), else opened here."""
        self._check_open()
        # One bar for the whole load, shown only if it takes over a second: reading the file
        # (metadata, tokenizer) is its first step, then one step per weight tensor.
        bar = tqdm(total=1, desc=f"loading {spec.model}", unit="step", delay=1.0,
                   disable=not self._progress, file=sys.stderr, leave=False)
        with bar:
            return self._load(spec, bar, files)

    def _load(self, spec: ModelSpec, bar: tqdm, opened: ModelFiles | None) -> ModelHandle:
        files, tokenizer, ctx = open_files(spec, bar, opened)
        prepared = self._backend.prepare(files, spec, bar,
                                         KVBudget(self._kv_memory, self._kv_block_size))
        handle = model_handle(spec, files, tokenizer, ctx, backend=self._backend.name,
                              device=prepared.device, dtype=prepared.dtype)
        self._install(prepared, tokenizer=tokenizer, ctx=ctx, handle=handle,
                      fingerprint=fingerprint(files, prepared.dtype),
                      kv_reach=files.config.kv_reach)
        return handle

    def _decoder_tokens(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Each text's tokens for decoder embeddings: cut to the context (truncate) or refused."""
        tokens = []
        for i, text in enumerate(texts):
            ids = self.tokenize(text) or [self.tokenizer.bos_id or 0]
            if len(ids) > self._ctx:
                if not truncate:
                    raise ContextOverflowError(
                        f"texts[{i}] is {len(ids)} tokens but the context is {self._ctx}; "
                        "shorten it or pass truncate=True to embed its first "
                        f"{self._ctx} tokens")
                ids = ids[: self._ctx]
            tokens.append(ids)
        return tokens

    def _make_embedder(self, model: str) -> Any:
        """The sentence encoder `embed` runs (on the kernels on a CPU, else on torch)."""
        from llama_runtime.embedder import SentenceEmbedder

        return SentenceEmbedder(model, backend=self._backend.embed_backend,
                                device=self._backend.embed_device,
                                threads=self._backend.threads)

    def _install(self, prepared: Prepared, *, tokenizer: Tokenizer, ctx: int, fingerprint: str,
                 handle: ModelHandle, kv_reach: int) -> None:
        """Make a loaded model current: the old scheduler stopped and its sessions closed,
        then `prepared.activate` (the backend swaps in its model), a fresh KV cache over its
        store and a new scheduler. kv_reach: DecoderConfig.kv_reach (a session's K/V older than
        that is given back as it grows)."""
        with self._lock:
            self._check_open()
            if self._scheduler is not None:
                self._scheduler.shutdown()
                if not self._scheduler.stopped:
                    raise SessionError(
                        "the previous model is still computing a step; load the new model "
                        "again once it has finished")
            self._drop_sessions()
            if self._stop_finalizer is not None:  # it holds the old scheduler, cache and store
                self._stop_finalizer.detach()
            self._scheduler = self._store = None
            with self._forward_lock:  # no forward (nor decoder embedding) sees half a swap
                prepared.activate()
            self._weight_paths = prepared.weight_paths
            self._tokenizer, self._ctx = tokenizer, ctx
            self._fingerprint = fingerprint
            self._cache = PagedKVCache(prepared.num_blocks, block_size=self._kv_block_size,
                                       hash_namespace=fingerprint, window=kv_reach)
            self._store = store = prepared.store
            # The scheduler reaches the engine through weak references, so an engine nobody
            # holds is collected (and its finalizer below stops the thread).
            self._scheduler = Scheduler(
                self._cache, _weakly(self._locked_step), store.copy_blocks,
                free_session=_weakly(self._free_session), max_batch=self._max_batch,
                max_step_tokens=self._prefill_chunk, kv_policy=self._kv_policy,
                housekeeping=_weakly(self._reap))
            # Stop the model thread before the interpreter tears down (a thread still inside
            # native code at exit aborts the process) or when the engine is dropped.
            self._stop_finalizer = weakref.finalize(self, self._scheduler.shutdown)
            self._handle = handle

    def close(self) -> None:
        """Stop the model thread and release the model, its KV cache and the embedder. Running
        streams end with finish reason "cancelled"; afterwards every method raises
        EngineClosedError at once. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sched = self._scheduler
        if sched is not None:
            sched.shutdown()
            with sched.lock:
                self._drop_sessions()
        if self._stop_finalizer is not None:
            self._stop_finalizer.detach()
        with self._forward_lock:  # no decoder embedding is half way through the model
            self._release_model()
        with self._embed_load_lock:
            self._embedder = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _release_model(self) -> None:
        """Drop the backend's model and KV store (close())."""
        self._store = None
        self._backend.release()

    def _drop_sessions(self) -> None:
        """Mark every session closed (the model they belong to is going away)."""
        for sid in list(self._sessions.keys()):
            s = self._sessions.get(sid)
            if s is not None:
                _close_view(s)
        self._sessions.clear()
        self._orphans.clear()

    def _loaded(self, part: _T | None) -> _T:
        """A part of the loaded model, or SessionError when none is loaded (or the engine is
        closed: EngineClosedError)."""
        self._check_open()
        if part is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return part

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(
                "the engine is closed; create a new one with create_engine()")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def weight_paths(self) -> dict[str, str]:
        """How each weight tensor is held: kept quantized (multiplied by the compiled kernel) or
        dequantized to the compute dtype."""
        return dict(self._loaded(self._weight_paths))

    @property
    def model(self) -> ModelHandle:
        return self._loaded(self._handle)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._loaded(self._tokenizer)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidParamsError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(tokens, skip_special=skip_special)

    def apply_chat_template(self, messages: Sequence[ChatMessage], *,
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def embed(self, texts: Sequence[str], *, truncate: bool = True,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[float]]:
        """One vector per text: the embedding model's (loaded on first use:
        `embed_model`, default all-minilm-l6-v2), or with embed_model="decoder" the mean of the
        generating model's final hidden states, L2-normalized. A text longer than the model
        reads is cut (truncate=True) or raises ContextOverflowError."""
        self._check_open()
        texts = check_texts(texts)
        check_options(truncate, batch_size)
        if not texts:
            return []
        if self._embed_model == DECODER:
            self.model  # noqa: B018 - raises SessionError unless a model is loaded
            tokens = self._decoder_tokens(texts, truncate)
            return self._backend.decoder_embed(tokens, batch_size=batch_size,
                                               chunk=self._prefill_chunk,
                                               lock=self._forward_lock).tolist()
        return self._get_embedder().embed(texts, truncate=truncate, batch_size=batch_size)

    def embed_token_counts(self, texts: Sequence[str], *, truncate: bool = True) -> list[int]:
        """How many tokens `embed` reads of each text (for usage reports)."""
        self._check_open()
        texts = check_texts(texts)
        if self._embed_model == DECODER:
            return [len(t) for t in self._decoder_tokens(texts, truncate)]
        return [len(t) for t in self._get_embedder().tokenize(texts, truncate=truncate)]

    @property
    def embed_model_name(self) -> str:
        """What `embed` runs: the embedding model's name, or "decoder:<model>"."""
        if self._embed_model == DECODER:
            return f"{DECODER}:{self.model.name}"
        return self._embed_model or DEFAULT_EMBED_MODEL

    def load_embed_model(self, model: str = DEFAULT_EMBED_MODEL) -> None:
        """Load the sentence encoder `embed` uses (a registered name or a sentence-transformers
        / HF BERT directory), replacing any loaded before; "decoder" switches to the
        generating model's mean-pooled states."""
        self._check_open()
        with self._embed_load_lock:
            if model == DECODER:
                self.model  # noqa: B018 - raises unless a generating model is loaded
                self._embedder = None
            else:
                self._embedder = self._make_embedder(model)
            self._embed_model = model

    def _get_embedder(self) -> Any:
        with self._embed_load_lock:
            if self._embedder is None:
                self._embedder = self._make_embedder(self._embed_model or DEFAULT_EMBED_MODEL)
            return self._embedder

    def _locked_step(self, tokens: list[int], positions: list[int],
                     seqs: list[SeqStep]) -> np.ndarray:
        with self._forward_lock:
            return self._backend.step(tokens, positions, seqs)

    def new_session(self) -> Session:
        sched = self._sched()
        s = Session()
        s.backend_state = _OPEN
        with sched.lock:
            self._reap()
            self._cache.allocate(s.id)
            self._register(s, sched)
        return s

    def _register(self, s: Session, sched: Scheduler) -> None:
        """Track `s` (its tokens read from the KV cache, which owns them); if its caller drops
        it without close_session, its blocks are freed."""
        s.bind(functools.partial(_context_of, weakref.ref(self._cache), s.id))
        self._sessions[s.id] = s
        weakref.finalize(s, _orphaned, self._orphans, s.id, weakref.ref(sched))

    def _reap(self) -> None:
        """Free the sessions their callers dropped (with the scheduler lock held)."""
        while self._orphans:
            sid = self._orphans.popleft()
            if sid not in self._sessions and sid in self._cache:
                self._forget(sid)

    def _forget(self, session_id: str) -> None:
        """Free a session's blocks and its pending logits (with the scheduler lock held)."""
        self._cache.free(session_id)
        if self._scheduler is not None:
            self._scheduler.forget(session_id)

    def close_session(self, session: Session) -> None:
        """Release the session's KV blocks (cancelling its request, if one runs). Does nothing
        for a session already closed, or once the engine is closed."""
        if self._closed:
            session.closed = True
            return
        sched = self._sched()
        with sched.lock:
            if self._sessions.get(session.id) is not session:
                session.closed = True
                return
            session.closed = True
            if sched.cancel_session(session.id):
                return  # the scheduler frees it when its request ends, within one step
            self._free_session(session)

    def save_session(self, session: Session, path: str | os.PathLike[str]) -> None:
        """Write the session's tokens and K/V (float32) to `path`, with a format version and the
        model's fingerprint so another model refuses it. Any backend reads it back. The write is
        atomic: if it fails, a file already at `path` is left as it was."""
        self._state(session)
        session.acquire()
        try:
            with self._sched().lock:
                tokens = list(session.tokens)
                slots, released = saved_slots(self._cache, session.id, len(tokens))
            assert self._store is not None
            save_kv(path, store=self._store, tokens=tokens, slots=slots, released=released,
                    model=self._fingerprint)
        finally:
            session.release()

    def load_session(self, path: str | os.PathLike[str]) -> Session:
        """A new session holding what `save_session` wrote; it continues exactly where the
        saved one stopped. The file is checked in full before anything is allocated, and its
        K/V serve this session only (never another session's prompt through the prefix
        cache)."""
        sched = self._sched()
        store = self._store
        assert store is not None
        saved = read_session(path, model=self._fingerprint, context_length=self._ctx,
                             vocab_size=self.model.vocab_size, kv_shape=store.kv_shape)
        s = Session()
        s.backend_state = _OPEN
        with sched.lock:
            self._reap()
            import_kv(saved, cache=self._cache, store=store, session_id=s.id)
            self._register(s, sched)
        return s

    def _free_session(self, session: Session) -> None:
        """Called with the scheduler lock held."""
        if self._sessions.pop(session.id, None) is not None:
            self._forget(session.id)
        _close_view(session)

    def stats(self) -> dict[str, Any]:
        self._check_open()
        if self._scheduler is None and self._embedder is not None:  # an embeddings-only engine
            return {"kv_blocks_total": 0, "kv_blocks_free": 0, "kv_blocks_cached": 0,
                    "kv_blocks_used": 0, "sessions_active": 0, "requests_running": 0,
                    "requests_waiting": 0}
        sched = self._sched()
        with sched.lock:
            self._reap()
            kv = self._cache.stats()
            return {
                **kv,
                "kv_block_tokens": self._cache.block_size,
                "kv_bytes_total": self._store.nbytes,
                "kv_dtype": self._store.dtype_name,
                "decode": self.decode_kernel,
                "sessions_active": len(self._sessions),
                "requests_running": sched.running(),
                "requests_waiting": sched.waiting(),
            }

    def _sched(self) -> Scheduler:
        return self._loaded(self._scheduler)

    def _state(self, session: Session) -> None:
        self._check_open()
        if session.closed or session.backend_state is None:
            raise SessionError(
                f"session {session.id} is closed; create a new one with new_session()")
        if self._sessions.get(session.id) is not session:
            raise SessionError(f"session {session.id} does not belong to this engine")

    def _logits_of(self, session: Session) -> np.ndarray | None:
        if session.backend_state is None:
            return None
        sched = self._sched()
        with sched.lock:
            return sched.logits_of(session.id)

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        tokens = list(tokens)
        if not tokens:
            raise InvalidParamsError("prefill needs at least one token")
        vocab = self.model.vocab_size
        bad = next((t for t in tokens if not isinstance(t, int | np.integer) or not
                    0 <= t < vocab), None)
        if bad is not None:
            raise InvalidTokenError(
                f"token id {bad!r} is outside the vocabulary [0, {vocab}); pass ids from "
                "tokenize()")
        if len(tokens) >= self._ctx:
            raise ContextOverflowError(
                f"prompt is {len(tokens)} tokens but the context is {self._ctx}; shorten the "
                "prompt or load the model with a larger context_length=")
        return [int(t) for t in tokens]

    def prefill(self, session: Session, tokens: Sequence[int]) -> PrefillResult:
        self._state(session)
        tokens = self._check_tokens(tokens)
        session.acquire()
        try:
            req = self._sched().submit(Request(session=session, prompt=tokens,
                                               make_generation=None))
            while (item := req.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
        finally:
            session.release()
        if req.prefill is None:
            raise SessionError(f"prefill of session {session.id} was cancelled")
        return req.prefill

    def next_token_logits(self, session: Session) -> np.ndarray:
        """float32 [vocab]: the model's logits for the token after the session's context (for
        parity checks and custom samplers)."""
        self._check_open()
        logits = self._logits_of(session) if not session.closed else None
        if logits is None:
            raise SessionError(f"session {session.id} has no prompt; call prefill() first")
        return logits.copy()

    def decode(self, session: Session, params: SamplingParams) -> TokenStream:
        self._state(session)
        if self._logits_of(session) is None or session.last_prefill is None:
            raise SessionError(f"session {session.id} has no prompt; call prefill() first")
        if not isinstance(params, SamplingParams):
            raise InvalidParamsError(
                f"params must be a SamplingParams, got {type(params).__name__}")
        return self._request_stream(session, None, params, own=False)

    def _stream_tokens(self, tokens: list[int], params: SamplingParams,
                       session: Session | None) -> TokenStream:
        tokens = self._check_tokens(tokens)
        if session is None:
            return self._request_stream(None, tokens, params, own=True)
        self._state(session)
        return self._request_stream(session, tokens, params, own=False)

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: ids against this model's vocabulary."""
        vocab = self.model.vocab_size
        for what, ids in (("logit_bias", params.logit_bias), ("stop_token_ids",
                                                                params.stop_token_ids)):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidTokenError(
                    f"{what} names token id {bad}, outside the vocabulary [0, {vocab}); use ids "
                    "from tokenize()")

    def _request_stream(self, session: Session | None, prompt: list[int] | None,
                        params: SamplingParams, *, own: bool) -> TokenStream:
        if not isinstance(params, SamplingParams):
            raise InvalidParamsError(
                f"params must be a SamplingParams, got {type(params).__name__}")
        self._check_params(params)
        grammar = None if params.response_format is None else Grammar.compile(
            params.response_format, self.tokenizer)  # a bad one fails here, before decoding
        if session is not None:
            session.acquire()  # fail now, in the caller's frame, if it is busy or closed
            session.release()
        deadline = None if params.timeout is None else time.perf_counter() + params.timeout

        def make_generation(usage: Usage, started_at: float) -> Generation:
            assert req_session is not None
            return Generation(self.tokenizer, params, req_session.tokens, usage=usage,
                              started_at=started_at, context_length=self._ctx, grammar=grammar)

        req_session = session
        outbox = Outbox()  # the request's chunks, from the scheduler

        def steps(cancel: threading.Event) -> Iterator[StreamChunk]:
            nonlocal req_session
            s = self.new_session() if own else session
            assert s is not None
            req_session = s
            s.acquire()
            req = Request(session=s, prompt=prompt, make_generation=make_generation,
                          own_session=own, deadline=deadline, cancel=cancel, out=outbox)
            try:
                self._sched().submit(req)
                while (item := req.out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()  # a no-op once the request is over; else the scheduler frees it
                if not _in_event_loop():  # a sync close() returns with the blocks freed
                    req.released.wait(timeout=_RELEASE_WAIT_S)
                s.release()

        return TokenStream(steps, outbox)



_RELEASE_WAIT_S = 10.0


def _close_view(s: Session) -> None:
    """Mark a session closed: callers see no tokens and no engine state."""
    s.closed, s.backend_state = True, None
    s.bind(None)


def _context_of(cache: weakref.ref[PagedKVCache], session_id: str) -> list[int]:
    """A session's tokens, as its engine's KV cache holds them (none once the cache is gone)."""
    c = cache()
    return [] if c is None else c.context(session_id)


def _orphaned(orphans: deque[str], session_id: str, sched: weakref.ref[Scheduler]) -> None:
    """A session was garbage-collected: queue its id to be freed (no lock may be taken here:
    the collector runs on whichever thread allocated)."""
    orphans.append(session_id)
    s = sched()
    if s is not None:
        s.wake()


def _weakly(method: Any) -> Any:
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        if bound is None:
            raise SessionError("the engine was closed")
        return bound(*args, **kwargs)

    return call


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
