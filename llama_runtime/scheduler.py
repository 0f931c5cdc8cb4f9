"""Continuous batching: one thread runs the model; every step serves all running requests.

Requests arrive from any thread (or asyncio task) through `submit`. The scheduler thread loops:

1. drop requests that were cancelled or ran past their deadline, freeing what they hold;
2. admit waiting requests, oldest first, while the batch has room and the KV cache can hold
   their prompts (a prompt that fits nowhere fails with `KVCacheFull`; one that only has to wait
   for others to finish waits, or fails at once under ``kv_policy="fail"``);
3. build one step: the next token of every decoding request, then prefill chunks of admitted
   prompts in arrival order up to ``max_step_tokens`` (a prompt only starts once the one before
   it is done, so blocks it shares from a still-prefilling prompt are always computed first);
4. run one forward for the whole step, sample every request that got logits, and hand each its
   chunk through its own queue.

Decoding requests are served every step before any prefill, so no one starves: a long prompt
slows each step but never stops the others. Only this thread touches the model and the KV
tensors; the KV bookkeeping is guarded by `lock`, which callers take for session bookkeeping.

Isolation: whatever goes wrong while admitting, planning, sampling or streaming one request
(any exception) ends that request alone with a typed `LlamaError`; only a failed forward fails
the requests of its step. Preemption (``kv_policy="wait"``): when a decoding request needs a
block and none is free, the newest request that is not yet part of this step is preempted, as
vLLM does: its blocks are released (full ones stay in the prefix cache) and it goes back to the
front of the queue with its whole context (prompt and tokens generated so far) as the prompt to
recompute; its generation state is kept, so it resumes with exactly the tokens it would have
produced alone. A request fails for lack of memory only when nothing else is running to give
room (it cannot fit the pool by itself, beside the idle sessions' blocks).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llama_engine import (
    EngineClosedError,
    GenerationError,
    LlamaError,
    OutOfKVMemoryError,
    PrefillResult,
    Session,
    StreamChunk,
    Usage,
)
from llama_engine.stream import Outbox
from llama_kv import PagedKVCache
from llama_kv.block_table import RELEASED
from llama_runtime.generation import Generation
from llama_runtime.step import SeqStep

__all__ = ["Request", "Scheduler"]

log = logging.getLogger(__name__)

# runs one forward: flat tokens, flat positions, per-sequence steps -> logits rows [M, vocab]
StepRunner = Callable[[list[int], list[int], list[SeqStep]], np.ndarray]


@dataclass(eq=False)
class Request:
    session: Session
    prompt: list[int] | None
    """The context to prefill (None: decode from what the session holds)."""
    make_generation: Callable[[Usage, float], Generation] | None
    """None for a prefill-only request."""
    own_session: bool = False
    deadline: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    out: Outbox = field(default_factory=Outbox)
    submitted: float = field(default_factory=time.perf_counter)
    # scheduler-side state
    gen: Generation | None = None
    todo: list[int] = field(default_factory=list)
    todo_slots: list[int] = field(default_factory=list)
    pos: int = 0
    ctx_slots: list[int] = field(default_factory=list)
    given_back: int = 0
    """Leading positions of ctx_slots given back (RELEASED): out of every layer's window."""
    next_token: int | None = None
    prefill: PrefillResult | None = None
    prefill_started: float = 0.0
    cached_tokens: int = 0
    preemptions: int = 0
    """Times this request was preempted (its context is recomputed when it is readmitted)."""
    done: bool = False
    released: threading.Event = field(default_factory=threading.Event)
    """Set once the request is over and what it held is freed."""


class Scheduler:
    def __init__(self, cache: PagedKVCache, run_step: StepRunner,
                 copy_blocks: Callable[[list[tuple[int, int]]], None], *,
                 max_batch: int = 32, max_step_tokens: int = 512, kv_policy: str = "wait",
                 free_session: Callable[[Session], None],
                 housekeeping: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.lock = threading.RLock()
        self._run_step = run_step
        self._copy_blocks = copy_blocks
        self._logits: dict[str, tuple[int, np.ndarray]] = {}
        """Each session's next-token logits, with the context length they follow (pending
        until a decode request samples from them)."""
        self._free_session = free_session
        self._housekeeping = housekeeping
        """Run under `lock` before each step (the engine frees sessions nobody holds)."""
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.kv_policy = kv_policy
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llama-engine-scheduler",
                                        daemon=True)
        self._thread.start()

    # -- from any thread ------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if self._stopping:
            raise EngineClosedError("the engine is closed; create a new one with create_engine()")
        self._inbox.put(req)
        self._wake.set()
        if self._stopping:  # shut down meanwhile: make sure the request is ended
            with self.lock:
                self._drain_inbox()
                self._finish(req, "cancelled", EngineClosedError(
                    "the engine was closed while this request was queued"))
        return req

    def logits_of(self, session_id: str) -> np.ndarray | None:
        """The logits after the session's context, when its last step left them (call with
        `lock` held, or accept a stale answer)."""
        got = self._logits.get(session_id)
        if got is None or session_id not in self.cache:
            return None
        n, logits = got
        return logits if n == self.cache.context_length(session_id) else None

    def forget(self, session_id: str) -> None:
        """Drop a freed session's logits (call with `lock` held)."""
        self._logits.pop(session_id, None)

    def wake(self) -> None:
        """Have the thread look at its queues now (e.g. sessions to free)."""
        self._wake.set()

    def waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def running(self) -> int:
        return len(self._running)

    def busy_sessions(self) -> set[str]:
        return {r.session.id for r in (*self._running, *self._waiting)}

    def cancel_session(self, session_id: str) -> bool:
        """Cancel every request of a session that is being closed, and have the scheduler free
        it when they end. Returns whether there were any (call with `lock` held)."""
        found = False
        for r in (*self._running, *self._waiting):
            if r.session.id == session_id and not r.done:
                r.cancel.set()
                r.own_session = True
                found = True
        return found

    def shutdown(self) -> None:
        """Stop the thread after its current step; requests still queued end as cancelled."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        with self.lock:
            self._drain_inbox()
            for r in [*self._running, *self._waiting]:
                self._finish(r, "cancelled")

    def _drain_inbox(self) -> None:
        try:
            while True:
                self._waiting.append(self._inbox.get_nowait())
        except queue.Empty:
            pass

    @property
    def stopped(self) -> bool:
        """The thread has ended (shutdown() waits at most 30 s for its current step)."""
        return not self._thread.is_alive()

    # -- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            with self.lock:
                self._drain_inbox()
                if self._housekeeping is not None:
                    # a LlamaError: the engine is being collected, and shutdown follows
                    with contextlib.suppress(LlamaError):
                        self._housekeeping()
            if not self._running and not self._waiting:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a broken step fails its requests, never the thread
                log.exception("scheduler step failed")
                with self.lock:
                    for r in list(self._running):
                        self._finish(r, "error", e)

    def _step(self) -> None:
        now = time.perf_counter()
        with self.lock:
            for r in list(self._running) + list(self._waiting):
                if r.cancel.is_set() or (r.deadline is not None and now > r.deadline):
                    self._finish(r, "cancelled")
            self._admit()
            seqs, tokens, positions, order = self._build_step()
        if not seqs:
            if self._waiting and not self._running:
                time.sleep(0.001)
            return
        try:
            logits = self._run_step(tokens, positions, seqs)
        except Exception as e:
            with self.lock:
                for r, step in zip(order, seqs, strict=True):  # those tokens were never computed
                    sid = r.session.id
                    try:
                        if sid in self.cache:  # (freed meanwhile only by a shutdown)
                            self.cache.set_context(sid,
                                                   self.cache.context_length(sid) - step.n_new)
                    finally:
                        self._finish(r, "error", e)
            return
        with self.lock:
            row = 0
            for r, s in zip(order, seqs, strict=True):
                if not s.want_logits:
                    continue
                try:
                    self._on_logits(r, logits[row])
                except Exception as e:  # this request's sampling or streaming: it alone fails
                    self._fail(r, e, "sampling")
                row += 1

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            r = self._waiting[0]
            if r.preemptions and self._running and not self._room_to_resume(r):
                return  # readmitted only with room to grow, else it is preempted again at once
            try:
                self._start(r)
            except OutOfKVMemoryError as e:
                if self.kv_policy == "wait" and self._running and not _never_fits(self.cache, r):
                    return  # retry once running requests free blocks
                self._waiting.popleft()
                self._finish(r, "error", e)
                continue
            except Exception as e:
                self._waiting.popleft()
                self._fail(r, e, "admission")
                continue
            self._waiting.popleft()
            self._running.append(r)

    def _room_to_resume(self, r: Request) -> bool:
        """Blocks for the preempted request's context plus one per running request."""
        need = -(-len(r.prompt or ()) // self.cache.block_size) + len(self._running) + 1
        return self.cache.num_free_blocks_with_eviction() >= need

    def _start(self, r: Request) -> None:
        sid = r.session.id
        r.prefill_started = time.perf_counter()
        if r.prompt is None:
            logits = self.logits_of(sid)
            if logits is None:
                raise LlamaError(f"session {sid} has no prompt; call prefill() first")
            r.ctx_slots = self.cache.slot_mapping(sid)
            r.given_back = self.cache.released_tokens(sid)
            r.pos = self.cache.context_length(sid)
            r.prefill = r.session.last_prefill
            self._begin_generation(r, logits)
            return
        plan = self.cache.prefill_plan(sid, r.prompt)
        if plan.copies:
            self._copy_blocks(list(plan.copies))
        self.cache.set_context(sid, plan.start_pos)
        r.pos = plan.start_pos
        if not r.preemptions:
            r.cached_tokens = plan.start_pos
        r.todo, r.todo_slots = list(plan.token_ids), list(plan.slot_mapping)
        r.ctx_slots = self.cache.slot_mapping(sid, 0, plan.start_pos) + r.todo_slots
        r.given_back = self.cache.released_tokens(sid)

    def _release_behind(self, r: Request) -> None:
        """Give back `r`'s blocks that its next row (at r.pos) and every later one cannot
        attend to (a model whose every layer has a sliding window): a long generation holds
        O(window) blocks. Done while planning the step, before its rows are placed, so the
        blocks it frees may serve another sequence of the same step."""
        gone = self.cache.release_behind(r.session.id, r.pos)
        if gone > r.given_back:
            r.ctx_slots[r.given_back:gone] = [RELEASED] * (gone - r.given_back)
            r.given_back = gone

    def _build_step(self) -> tuple[list[SeqStep], list[int], list[int], list[Request]]:
        seqs: list[SeqStep] = []
        tokens: list[int] = []
        positions: list[int] = []
        order: list[Request] = []
        budget = self.max_step_tokens
        for r in list(self._running):
            if r.next_token is None or r.done or r not in self._running:  # preempted meanwhile
                continue
            try:
                self._release_behind(r)
                plan = self._append_or_preempt(r, order)
                if plan is None:
                    continue
                if plan.copies:
                    self._copy_blocks(list(plan.copies))
            except Exception as e:
                self._fail(r, e, "planning its step")
                continue
            r.ctx_slots.extend(plan.slot_mapping)
            seqs.append(SeqStep(start=r.pos, n_new=1, write_slots=list(plan.slot_mapping),
                                context_slots=r.ctx_slots, want_logits=True, generated=True))
            tokens.append(r.next_token)
            positions.append(r.pos)
            order.append(r)
            budget -= 1
        for r in self._running:
            if not r.todo or budget <= 0:
                continue
            n = min(len(r.todo), budget)
            self._release_behind(r)
            chunk, slots = r.todo[:n], r.todo_slots[:n]
            done = n == len(r.todo)
            seqs.append(SeqStep(start=r.pos, n_new=n, write_slots=slots,
                                context_slots=r.ctx_slots[: r.pos + n], want_logits=done))
            tokens.extend(chunk)
            positions.extend(range(r.pos, r.pos + n))
            order.append(r)
            budget -= n
            if not done:
                break  # later prompts wait for this one (they may share its blocks)
        # advance the bookkeeping now; logits are applied after the forward
        for r, step in zip(order, seqs, strict=True):
            if r.next_token is not None:  # decoding: the fed token joins the context
                r.next_token = None
            else:
                del r.todo[: step.n_new]
                del r.todo_slots[: step.n_new]
            r.pos += step.n_new
            self.cache.set_context(r.session.id, r.pos)
        return seqs, tokens, positions, order

    def _append_or_preempt(self, r: Request, planned: list[Request]) -> Any:
        """Reserve the slot of `r`'s next token, preempting newer requests under "wait" when
        the pool is full. None when `r` itself was preempted or failed."""
        assert r.next_token is not None
        while True:
            try:
                return self.cache.append_tokens(r.session.id, [r.next_token])
            except OutOfKVMemoryError as e:
                victims = [v for v in self._running if v not in planned and not v.done]
                if self.kv_policy != "wait" or (victims == [r] and not planned):
                    self._finish(r, "error", e)  # nothing else runs: it cannot fit by itself
                    return None
                victim = max(victims, key=lambda v: v.submitted)
                self._preempt(victim)
                if victim is r:
                    return None

    def _preempt(self, r: Request) -> None:
        """Release `r`'s blocks and queue it to recompute its context (see the module doc)."""
        sid = r.session.id
        if r.next_token is not None:  # decoding: the context is every token it has seen
            r.prompt = [*self.cache.context(sid), r.next_token]
            r.next_token = None
        # else: prefilling, r.prompt is still the whole context to compute
        r.todo, r.todo_slots, r.ctx_slots = [], [], []
        r.given_back = 0
        r.preemptions += 1
        self.cache.truncate(sid, self.cache.context_length(sid), invalidate=True)
        self.cache.truncate(sid, 0)  # full blocks stay in the prefix cache for the recompute
        self._running.remove(r)
        i = 0  # back in the queue by arrival, ahead of everything newer
        while i < len(self._waiting) and self._waiting[i].submitted <= r.submitted:
            i += 1
        self._waiting.insert(i, r)
        log.info("preempted request of session %s (KV cache full); it resumes when room "
                 "returns", sid)

    def _fail(self, r: Request, error: BaseException, stage: str) -> None:
        """End `r` alone with a typed error (an untyped one is a bug: logged)."""
        if not isinstance(error, LlamaError):
            log.error("request of session %s failed while %s", r.session.id, stage,
                      exc_info=error)
            error = GenerationError(
                f"the request failed while {stage}: {type(error).__name__}: {error}; other "
                "requests are unaffected. Please report this with the request's parameters")
        self._finish(r, "error", error)

    def _on_logits(self, r: Request, logits: np.ndarray) -> None:
        self._logits[r.session.id] = (self.cache.context_length(r.session.id), logits)
        if r.gen is None:  # this row ends the request's prefill
            assert r.prompt is not None
            r.prefill = PrefillResult(
                num_tokens=len(r.prompt), cached_tokens=r.cached_tokens,
                prefill_seconds=time.perf_counter() - r.prefill_started,
                started_at=r.prefill_started)
            r.session.last_prefill = r.prefill
            if r.make_generation is None:
                self._finish(r, "stop")
                return
            self._begin_generation(r, logits)
            return
        self._sample(r, logits)

    def _begin_generation(self, r: Request, logits: np.ndarray) -> None:
        pre = r.prefill
        assert pre is not None and r.make_generation is not None
        usage = Usage(prompt_tokens=pre.num_tokens, cached_tokens=pre.cached_tokens,
                      prefill_ms=pre.prefill_seconds * 1e3)
        r.gen = r.make_generation(usage, pre.started_at)
        self._sample(r, logits)

    def _sample(self, r: Request, logits: np.ndarray) -> None:
        """One token for `r`: emit its chunk; end the request or queue the token to feed."""
        assert r.gen is not None
        chunk, finished = r.gen.step(logits)
        r.out.put(chunk)
        if finished:
            self._finish(r, None)
        else:
            r.next_token = chunk.token_id

    def _finish(self, r: Request, reason: str | None, error: BaseException | None = None) -> None:
        """End `r`: emit its last chunk or error, release what it holds. Idempotent."""
        if r.done:
            return
        r.done = True
        if r in self._running:
            self._running.remove(r)
        if r in self._waiting:
            self._waiting.remove(r)
        if reason is not None and r.gen is not None:
            try:
                r.out.put(r.gen.final(reason))  # type: ignore[arg-type]
            except Exception:  # the request is over either way
                log.exception("closing the stream of session %s failed", r.session.id)
        if error is not None:
            r.out.put(error if isinstance(error, LlamaError) else GenerationError(
                f"generation failed: {type(error).__name__}: {error}"))
        elif reason is not None and r.gen is None and r.make_generation is not None:
            r.out.put(StreamChunk(text="", token_id=None, finish_reason=reason,  # type: ignore[arg-type]
                                  usage=Usage()))
        r.out.put(None)  # end of stream
        sid = r.session.id
        try:
            if sid in self.cache and (
                    self.cache.num_tokens(sid) > self.cache.context_length(sid)):
                # planned but never computed (cancelled mid-prefill, failed step): nobody may
                # reuse it
                self.cache.truncate(sid, self.cache.context_length(sid), invalidate=True)
            if r.own_session:
                self._free_session(r.session)
        finally:
            r.released.set()


def _never_fits(cache: PagedKVCache, r: Request) -> bool:
    need = -(-len(r.prompt or ()) // cache.block_size)
    return need > cache.num_blocks

