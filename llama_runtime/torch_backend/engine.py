"""`TorchEngine`: the LlamaEngine of the torch backend (CPU now; CUDA with the same code)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llama_engine import (
    ChatMessage,
    ContextOverflowError,
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
    UnsupportedOperationError,
    Usage,
)
from llama_models import ModelFiles, RawTensor, open_model
from llama_models.dequant import dequantize
from llama_runtime.backends import pick_device
from llama_runtime.torch_backend.kv import SequenceBatch, SessionKV
from llama_runtime.torch_backend.ops import TorchOps
from llama_sampling import Sampler, StopChecker
from llama_tokenizer import Tokenizer

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_BLOCK_TOKENS = 16  # the unit stats() counts KV memory in


@dataclass(slots=True)
class _SessionState:
    kv: SessionKV
    logits: np.ndarray | None = None
    """Next-token logits after session.tokens, when `logits_len == len(session.tokens)`."""
    logits_len: int = -1


class TorchEngine(LlamaEngine):
    """One model on one torch device. Forward passes are serialised by a lock, so sessions may
    be driven from several threads; batching them into one forward is the scheduler's job."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 progress: bool = True, prefill_chunk: int = 512) -> None:
        self._device_name = device
        self._dtype_name = dtype
        self._progress = progress
        if prefill_chunk < 1:
            raise InvalidParamsError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self._prefill_chunk = prefill_chunk
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise InvalidParamsError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._handle: ModelHandle | None = None
        self._tokenizer: Tokenizer | None = None
        self._files: ModelFiles | None = None
        self._model: Any = None
        self._ctx = 0

    # -- loading --------------------------------------------------------------------------------
    def load_model(self, spec: ModelSpec) -> ModelHandle:
        device = torch.device(pick_device(spec.device if spec.device != "auto"
                                          else self._device_name))
        dtype_name = spec.dtype if spec.dtype != "auto" else self._dtype_name
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        # One bar for the whole load, shown only if it takes over a second: reading the file
        # (metadata, tokenizer) is its first step, then one step per weight tensor.
        bar = tqdm(total=1, desc=f"loading {spec.model}", unit="step", delay=1.0,
                   disable=not self._progress, file=sys.stderr, leave=False)
        with bar:
            return self._load(spec, device, dtype_name, bar)

    def _load(self, spec: ModelSpec, device: torch.device, dtype_name: str,
              bar: tqdm) -> ModelHandle:
        dtype = _DTYPES[dtype_name]
        files = open_model(spec.model)
        ckpt = files.checkpoint
        if ckpt.format == "gguf":
            tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata)
        else:
            tokenizer = Tokenizer.from_hf_dir(ckpt.path)
        cfg = files.config
        ctx = cfg.context_length
        if spec.context_length is not None:
            if spec.context_length > cfg.context_length:
                raise InvalidParamsError(
                    f"context_length={spec.context_length} exceeds the model's trained context "
                    f"of {cfg.context_length}; pass at most {cfg.context_length}")
            ctx = spec.context_length
        bar.total = 1 + len(files.weights)
        bar.update(1)
        prepared = self._prepare_weights(files.weights, device, dtype, bar)
        ops = TorchOps(device, dtype)
        with self._lock:
            for s in list(self._sessions.values()):
                self.close_session(s)
            self._files, self._tokenizer, self._ctx = files, tokenizer, ctx
            self._model = files.build(prepared, ops)
            self._device, self._dtype = device, dtype
            self._handle = ModelHandle(
                name=spec.model, path=str(ckpt.path), architecture=ckpt.architecture,
                vocab_size=cfg.vocab_size, context_length=ctx, n_params=ckpt.n_params,
                quant_types=ckpt.quant_types(), has_chat_template=tokenizer.chat_template
                is not None, eos_token_ids=tuple(sorted(tokenizer.eog_ids)), backend="torch",
                device=str(device), dtype=dtype_name)
        return self._handle

    @staticmethod
    def _prepare_weights(weights: dict[str, RawTensor], device: torch.device,
                         dtype: torch.dtype, bar: tqdm) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for name, raw in weights.items():
                if isinstance(raw.data, torch.Tensor):
                    w = raw.data.to(device=device, dtype=dtype)
                else:
                    data = torch.from_numpy(np.array(raw.data, copy=True)).to(device)
                    w = dequantize(data, raw.qtype, raw.shape).to(dtype)
                out[name] = w.contiguous()
                bar.update(1)
        return out

    @property
    def model(self) -> ModelHandle:
        if self._handle is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return self._handle

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return self._tokenizer

    # -- text -----------------------------------------------------------------------------------
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

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise UnsupportedOperationError(
            "this engine has no embedding model loaded; embeddings are not available yet in "
            "the torch engine (an encoder such as all-minilm-l6-v2 is planned)")

    # -- sessions -------------------------------------------------------------------------------
    def new_session(self) -> Session:
        cfg = self._cfg()
        s = Session()
        s.backend_state = _SessionState(SessionKV(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self._ctx, self._device, self._dtype))
        with self._lock:
            self._sessions[s.id] = s
        return s

    def close_session(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            session.closed = True
            session.backend_state = None
            session.tokens = []

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states = [s.backend_state for s in self._sessions.values() if s.backend_state]
            cap = sum(st.kv.capacity for st in states)
            used = sum(st.kv.length for st in states)
            return {
                "kv_block_tokens": KV_BLOCK_TOKENS,
                "kv_blocks_total": -(-cap // KV_BLOCK_TOKENS),
                "kv_blocks_free": (cap - used) // KV_BLOCK_TOKENS,
                "kv_blocks_cached": 0,
                "kv_bytes": sum(st.kv.nbytes for st in states),
                "sessions_active": len(states),
                "requests_waiting": 0,
            }

    def _cfg(self) -> Any:
        if self._files is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return self._files.config

    def _state(self, session: Session) -> _SessionState:
        if session.closed or session.backend_state is None:
            raise SessionError(
                f"session {session.id} is closed; create a new one with new_session()")
        if self._sessions.get(session.id) is not session:
            raise SessionError(f"session {session.id} does not belong to this engine")
        return session.backend_state

    # -- compute --------------------------------------------------------------------------------
    def _forward(self, st: _SessionState, tokens: Sequence[int], start: int) -> np.ndarray:
        dev = self._device
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.arange(start, start + len(tokens), device=dev)
        batch = SequenceBatch.make(st.kv, start, len(tokens))
        with torch.inference_mode():
            logits = self._model.forward(ids, pos, batch)
        st.kv.length = start + len(tokens)
        return logits[-1].float().cpu().numpy()

    def prefill(self, session: Session, tokens: Sequence[int]) -> PrefillResult:
        st = self._state(session)
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
        t0 = time.perf_counter()
        common = _common_prefix(session.tokens, tokens)
        with self._lock:
            if common == len(tokens) == st.logits_len:
                keep = common  # nothing new: the logits after the last token are at hand
            else:
                keep = min(common, len(tokens) - 1)
                st.kv.truncate(keep)
                del session.tokens[keep:]
                for i in range(keep, len(tokens), self._prefill_chunk):
                    chunk = tokens[i:i + self._prefill_chunk]
                    st.logits = self._forward(st, chunk, i)
                    session.tokens.extend(chunk)
                st.logits_len = len(session.tokens)
        result = PrefillResult(num_tokens=len(tokens), cached_tokens=keep,
                               prefill_seconds=time.perf_counter() - t0, started_at=t0)
        session.last_prefill = result
        return result

    def next_token_logits(self, session: Session) -> np.ndarray:
        """float32 [vocab]: the model's logits for the token after the session's context (for
        parity checks and custom samplers)."""
        st = self._state(session)
        if st.logits is None or st.logits_len != len(session.tokens):
            raise SessionError(f"session {session.id} has no prompt; call prefill() first")
        return st.logits.copy()

    def decode(self, session: Session, params: SamplingParams) -> TokenStream:
        st = self._state(session)
        if st.logits_len != len(session.tokens) or session.last_prefill is None:
            raise SessionError(f"session {session.id} has no prompt; call prefill() first")
        if not isinstance(params, SamplingParams):
            raise InvalidParamsError(
                f"params must be a SamplingParams, got {type(params).__name__}")
        return TokenStream(lambda cancel: self._decode_steps(session, params, cancel))

    def _decode_steps(self, session: Session, params: SamplingParams,
                      cancel: threading.Event) -> Iterator[StreamChunk]:
        st = self._state(session)
        tok = self.tokenizer
        pre = session.last_prefill
        assert pre is not None and st.logits is not None
        sampler = Sampler(params)
        detok = tok.stream_decoder(skip_special=True, continuation=True)
        stop = StopChecker(params.stop)
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tok.eog_ids))
        usage = Usage(prompt_tokens=pre.num_tokens, cached_tokens=pre.cached_tokens,
                      prefill_ms=pre.prefill_seconds * 1e3)
        history = list(session.tokens)
        logits = st.logits
        t_first = 0.0
        n = 0
        while not cancel.is_set():
            s = sampler.sample(logits, history)
            n += 1
            now = time.perf_counter()
            if n == 1:
                t_first = now
                usage.ttft_ms = (now - pre.started_at) * 1e3
            tid = s.token_id
            history.append(tid)
            finish: str | None = None
            if tid in end_ids:
                finish, text = "stop", ""
            else:
                text, hit = stop.push(detok.push(tid))
                if hit:
                    finish = "stop"
            if finish is None and (n >= params.max_tokens or len(session.tokens) + 1 >= self._ctx):
                finish = "length"
            if finish is not None:
                if not stop.stopped:
                    tail, _ = stop.push(detok.flush())
                    text += tail + stop.flush()
                usage.completion_tokens = n
                usage.decode_ms = (time.perf_counter() - t_first) * 1e3
                yield StreamChunk(text=text, token_id=tid, logprob=s.logprob,
                                  top_logprobs=s.top_logprobs, finish_reason=finish,  # type: ignore[arg-type]
                                  usage=usage)
                return
            yield StreamChunk(text=text, token_id=tid, logprob=s.logprob,
                              top_logprobs=s.top_logprobs)
            with self._lock:
                self._state(session)
                logits = self._forward(st, [tid], len(session.tokens))
                session.tokens.append(tid)
                st.logits, st.logits_len = logits, len(session.tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

