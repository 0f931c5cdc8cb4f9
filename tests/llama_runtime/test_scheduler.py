"""The scheduler on a fake backend, no model loaded: admission order, fairness between decoding
requests and long prompts, preemption, cancellation and a failing forward.

`HashModel` stands in for a backend's step. It keeps a token per KV slot, writes each new token
at the slot the scheduler assigns, and computes a sequence's next token from the tokens it reads
back through the sequence's context slots (a hash of the whole context). So any mistake in the
slots the scheduler hands out (a block given to two sequences, a copy-on-write missed, a
preempted request resumed over the wrong context) changes the tokens, and every request must
produce exactly the tokens it would produce alone (`solo`)."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from llama_engine import GenerationError, SamplingParams, Session, Usage
from llama_kv import PagedKVCache
from llama_runtime.generation import Generation
from llama_runtime.scheduler import Request, Scheduler
from llama_runtime.step import SeqStep
from llama_tokenizer import Tokenizer

VOCAB = 1000  # token ids below this (the tokenizer's vocabulary is larger)


def _next(context: Sequence[int]) -> int:
    return 100 + zlib.crc32(np.asarray(context, dtype=np.int64).tobytes()) % (VOCAB - 100)


def solo(prompt: list[int], n: int) -> list[int]:
    """The tokens a request produces alone: each the hash of everything before it."""
    ctx, out = list(prompt), []
    for _ in range(n):
        out.append(_next(ctx))
        ctx.append(out[-1])
    return out


class HashModel:
    """A backend's step (and its KV store's copy_blocks) over a dict of slot -> (token,
    position). Records each step's sequences as (n_new, position of the first new token)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.kv: dict[int, tuple[int, int]] = {}
        self.steps: list[list[tuple[int, int]]] = []
        self.fail_at: int | None = None  # raise on this step (0-based)
        self.delay = 0.0

    def step(self, tokens: list[int], positions: list[int], seqs: list[SeqStep]) -> np.ndarray:
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            self.steps.append([])
            raise RuntimeError("the device fell over")
        self.steps.append([(s.n_new, s.start) for s in seqs])
        time.sleep(self.delay)
        rows, at = [], 0
        for s in seqs:
            for i, slot in enumerate(s.write_slots):
                assert positions[at + i] == s.start + i
                self.kv[slot] = (tokens[at + i], s.start + i)
            at += s.n_new
            if s.want_logits:
                context = [self.kv[slot] for slot in s.context_slots]
                assert [p for _, p in context] == list(range(len(context))), "slots mixed up"
                row = np.full(self.vocab, -10.0, dtype=np.float32)
                row[_next([t for t, _ in context])] = 10.0
                rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, self.vocab), np.float32)

    def copy_blocks(self, copies: list[tuple[int, int]], block_size: int) -> None:
        for src, dst in copies:
            for off in range(block_size):
                if src * block_size + off in self.kv:
                    self.kv[dst * block_size + off] = self.kv[src * block_size + off]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer, read from its GGUF's metadata (no weights)."""
    from llama_models import resolve_model_path
    from llama_models.gguf_file import read_gguf_file

    return Tokenizer.from_gguf_metadata(read_gguf_file(resolve_model_path(
        "smollm2-135m-instruct"))[0])


class Harness:
    """A scheduler over a PagedKVCache and a HashModel, wired as the engine wires it."""

    def __init__(self, tokenizer: Tokenizer, *, num_blocks: int = 64, block_size: int = 4,
                 max_batch: int = 8, max_step_tokens: int = 16,
                 kv_policy: str = "wait") -> None:
        self.tokenizer = tokenizer
        self.cache = PagedKVCache(num_blocks, block_size=block_size, hash_namespace="fake")
        self.model = HashModel(tokenizer.vocab_size)
        self.sched = Scheduler(
            self.cache, self.model.step,
            lambda copies: self.model.copy_blocks(copies, block_size),
            free_session=self._free, max_batch=max_batch, max_step_tokens=max_step_tokens,
            kv_policy=kv_policy)

    def _free(self, s: Session) -> None:
        if s.id in self.cache:
            self.cache.free(s.id)
        s.closed = True

    def request(self, prompt: list[int], max_tokens: int) -> Request:
        """A generate() request on its own session (freed when it ends)."""
        s = Session()
        with self.sched.lock:
            self.cache.allocate(s.id)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

        def make_generation(usage: Usage, started_at: float) -> Generation:
            return Generation(self.tokenizer, params, s.tokens, usage=usage,
                              started_at=started_at, context_length=1 << 20)

        return Request(session=s, prompt=list(prompt), make_generation=make_generation,
                       own_session=True)

    def submit_all(self, reqs: list[Request]) -> None:
        """Submit together: the scheduler sees them in this order in one look."""
        with self.sched.lock:
            for r in reqs:
                self.sched.submit(r)

    @staticmethod
    def tokens(req: Request, timeout: float = 60.0) -> tuple[list[int], Any]:
        """The request's tokens and how it ended (a finish reason, or the error raised)."""
        out: list[int] = []
        end: Any = None
        deadline = time.monotonic() + timeout
        while True:
            item = req.out.get(timeout=max(0.1, deadline - time.monotonic()))
            if item is None:
                return out, end
            if isinstance(item, BaseException):
                end = item
            else:
                if item.token_id is not None:
                    out.append(item.token_id)
                if item.finish_reason is not None:
                    end = item.finish_reason

    def settle(self) -> dict[str, int]:
        for _ in range(200):
            with self.sched.lock:
                if not self.sched.running() and not self.sched.waiting():
                    return self.cache.stats()
            time.sleep(0.01)
        raise AssertionError("the scheduler did not settle")

    def close(self) -> None:
        self.sched.shutdown()


def _prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 3 * j) % 97 + 1 for j in range(n)]


@pytest.fixture
def harness(tokenizer: Tokenizer, request: pytest.FixtureRequest):
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        made.append(Harness(tokenizer, **kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_every_request_gets_its_solo_tokens_in_any_batch(harness) -> None:
    h = harness(max_batch=4, max_step_tokens=8)
    reqs = [h.request(_prompt(i, 1 + 3 * i), 6 + i) for i in range(12)]
    h.submit_all(reqs)
    for i, r in enumerate(reqs):
        got, end = h.tokens(r)
        assert got == solo(_prompt(i, 1 + 3 * i), 6 + i) and end == "length", i
    assert h.settle()["kv_blocks_used"] == 0
    assert max(len(s) for s in h.model.steps) <= 4  # max_batch
    assert max(sum(n for n, _ in s) for s in h.model.steps) <= 8 + 4  # chunk + decode rows


def test_admission_is_first_come_first_served(harness) -> None:
    """With room for two at a time, five requests start in the order they came, each as soon as
    one before it has finished."""
    h = harness(max_batch=2, max_step_tokens=64)
    h.model.delay = 0.002
    reqs = [h.request(_prompt(i, 5), 3) for i in range(5)]
    starts: list[int] = []
    done = threading.Event()
    order: list[int] = []

    def watch(i: int, r: Request) -> None:
        h.tokens(r)
        order.append(i)
        if len(order) == len(reqs):
            done.set()

    h.submit_all(reqs)
    threads = [threading.Thread(target=watch, args=(i, r)) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    assert done.wait(30)
    # each prompt step is a sequence of 5 new tokens starting at position 0
    for step_no, step in enumerate(h.model.steps):
        starts += [step_no] * sum(1 for n, start in step if n == 5 and start == 0)
    assert len(starts) == 5 and starts == sorted(starts)
    assert starts[2] > starts[0]  # the third waited for room
    assert max(len(s) for s in h.model.steps) <= 2


def test_decoding_requests_are_served_every_step_while_a_long_prompt_prefills(harness) -> None:
    h = harness(max_batch=4, max_step_tokens=8)
    h.model.delay = 0.002
    first = h.request(_prompt(1, 4), 40)
    h.submit_all([first])
    while not any(n == 1 for step in h.model.steps for n, _ in step):
        time.sleep(0.001)  # decoding has begun
    long = h.request(_prompt(2, 70), 4)
    h.submit_all([long])
    got_first, _ = h.tokens(first)
    got_long, _ = h.tokens(long)
    assert got_first == solo(_prompt(1, 4), 40) and got_long == solo(_prompt(2, 70), 4)
    chunked = [s for s in h.model.steps if any(n > 1 and start > 0 for n, start in s)]
    assert len(chunked) >= 70 // 8 - 1  # the prompt went in chunks of at most 8 rows...
    for step in chunked:  # ...and every one of those steps also advanced the decoding request
        assert sum(1 for n, _ in step if n == 1) == 1, step


def test_preempted_requests_resume_with_their_solo_tokens(harness) -> None:
    """Two growing requests that cannot both fit: the newer is preempted (its blocks given
    back), recomputes its context when readmitted, and both end with their solo tokens."""
    h = harness(num_blocks=10, block_size=4, max_batch=4, max_step_tokens=16)
    reqs = [h.request(_prompt(i, 8), 22) for i in range(2)]
    h.submit_all(reqs)
    for i, r in enumerate(reqs):
        got, end = h.tokens(r)
        assert got == solo(_prompt(i, 8), 22) and end == "length"
    assert reqs[0].preemptions == 0 and reqs[1].preemptions >= 1
    assert h.settle()["kv_blocks_used"] == 0
    h.cache.check()


def test_kv_policy_fail_ends_the_request_that_finds_no_block(harness) -> None:
    """Under kv_policy="fail" nothing is preempted: the request that needs a block when none is
    free fails with a typed error, and the other finishes with its solo tokens."""
    from llama_engine import OutOfKVMemoryError

    h = harness(num_blocks=10, block_size=4, kv_policy="fail")
    reqs = [h.request(_prompt(i, 8), 22) for i in range(2)]
    h.submit_all(reqs)
    results = [h.tokens(r) for r in reqs]
    failed = [i for i, (_, end) in enumerate(results) if isinstance(end, OutOfKVMemoryError)]
    assert len(failed) == 1
    ok = 1 - failed[0]
    assert results[ok] == (solo(_prompt(ok, 8), 22), "length")
    assert all(r.preemptions == 0 for r in reqs)
    assert h.settle()["kv_blocks_used"] == 0


def test_a_cancelled_request_frees_its_blocks_and_spares_the_others(harness) -> None:
    h = harness(max_batch=4)
    h.model.delay = 0.002
    keep, drop = h.request(_prompt(3, 6), 30), h.request(_prompt(4, 6), 1000)
    h.submit_all([keep, drop])
    got: list[int] = []
    while len(got) < 3:
        item = drop.out.get(timeout=30)
        got.append(item.token_id)
    drop.cancel.set()
    assert drop.released.wait(5)
    assert drop.done and drop.session.closed
    rest, end = h.tokens(drop)
    assert end == "cancelled" and len(got) + len(rest) < 1000
    assert h.tokens(keep) == (solo(_prompt(3, 6), 30), "length")
    assert h.settle()["kv_blocks_used"] == 0


def test_a_failing_forward_fails_its_step_and_the_scheduler_goes_on(harness) -> None:
    h = harness(max_batch=4)
    h.model.fail_at = 3
    reqs = [h.request(_prompt(i, 5), 10) for i in range(2)]
    h.submit_all(reqs)
    for r in reqs:
        _, end = h.tokens(r)
        assert isinstance(end, GenerationError), end
    assert h.settle()["kv_blocks_used"] == 0
    after = h.request(_prompt(9, 5), 6)
    h.submit_all([after])
    assert h.tokens(after) == (solo(_prompt(9, 5), 6), "length")


def test_requests_sharing_a_prefix_reuse_its_blocks_and_keep_their_tokens(harness) -> None:
    """Prompts with a common 13-token prefix, one after another: later ones read the first's
    full blocks from the prefix cache (a shared block is never written: the partly filled one is
    copied on write), and every request still gets its solo tokens."""
    h = harness(max_batch=4, block_size=4)
    prefix = _prompt(5, 13)
    first = h.request([*prefix, 11], 5)
    h.submit_all([first])
    assert h.tokens(first) == (solo([*prefix, 11], 5), "length")
    reqs = [h.request([*prefix, 20 + i, 30 + i], 8) for i in range(3)]
    h.submit_all(reqs)
    for i, r in enumerate(reqs):
        assert h.tokens(r) == (solo([*prefix, 20 + i, 30 + i], 8), "length")
        assert r.cached_tokens == 12  # three full blocks of the prefix
    assert h.settle()["kv_blocks_used"] == 0
