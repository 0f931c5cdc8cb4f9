"""`TorchEngine`: the LlamaEngine of the torch backend (CPU now; CUDA with the same code)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import weakref
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
    UnsupportedBackendError,
    Usage,
)
from llama_kv import PagedKVCache, kv_budget_blocks, kv_bytes_per_block
from llama_models import RawTensor, open_model
from llama_models.checkpoint import release_pages
from llama_models.dequant import dequantize
from llama_runtime.backends import physical_cores, pick_device
from llama_runtime.generation import Generation
from llama_runtime.scheduler import Request, Scheduler
from llama_runtime.torch_backend.embedder import (
    COMPUTE_LOCK,
    DEFAULT_BATCH_SIZE,
    TorchEmbedder,
    check_options,
    check_texts,
    decoder_embeddings,
)
from llama_runtime.torch_backend.fused import DECODE_KERNELS, FusedDecoder
from llama_runtime.torch_backend.ops import TorchOps
from llama_runtime.torch_backend.paged import PagedKVStore, SeqStep, StepBatch
from llama_runtime.torch_backend.qweights import KEPT_QUANTIZED, kernels, repack, weight_path
from llama_tokenizer import Tokenizer

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)

SESSION_FORMAT = "llama-engine-session/1"
AUTO_KV_CAP_BYTES = 4 * 2**30  # kv_memory="auto" never takes more than this
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"
DECODER = "decoder"
"""embed_model value: embed with the generating model's mean-pooled hidden states."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class _SessionState:
    logits: np.ndarray | None = None
    """Next-token logits after session.tokens, when `logits_len == len(session.tokens)`."""
    logits_len: int = -1


class TorchEngine(LlamaEngine):
    """One model on one torch device. Forward passes are serialised by a lock, so sessions may
    be driven from several threads; batching them into one forward is the scheduler's job."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 progress: bool = True, prefill_chunk: int = 512, kv_memory: int | str = "auto",
                 kv_block_size: int = 16, max_batch: int = 32, kv_policy: str = "wait",
                 weights: str = "auto", embed_model: str | None = None,
                 decode: str = "auto", kv_dtype: str = "auto") -> None:
        if weights not in ("auto", "dequant", "quantized"):
            raise InvalidParamsError(
                f"weights must be 'auto', 'dequant' or 'quantized', got {weights!r}")
        self._weights_mode = weights
        if decode not in ("auto", "torch", *DECODE_KERNELS):
            raise InvalidParamsError(
                f"decode must be 'auto', 'int8', 'exact' or 'torch', got {decode!r}")
        self._decode_mode = decode
        if kv_dtype not in ("auto", *_DTYPES):
            raise InvalidParamsError(
                f"kv_dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {kv_dtype!r}")
        self._kv_dtype_name = kv_dtype
        self._fused: FusedDecoder | None = None
        if kv_policy not in ("wait", "fail"):
            raise InvalidParamsError(f"kv_policy must be 'wait' or 'fail', got {kv_policy!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParamsError(f"max_batch must be a positive integer, got {max_batch!r}")
        self._kv_memory, self._kv_block_size = kv_memory, kv_block_size
        self._max_batch, self._kv_policy = max_batch, kv_policy
        self._scheduler: Scheduler | None = None
        self._quantized = False
        self._device_name = device
        self._dtype_name = dtype
        self._progress = progress
        if prefill_chunk < 1:
            raise InvalidParamsError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self._prefill_chunk = prefill_chunk
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InvalidParamsError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads or physical_cores())
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._handle: ModelHandle | None = None
        self._tokenizer: Tokenizer | None = None
        self._weight_paths: dict[str, str] | None = None
        self._model: Any = None
        self._ctx = 0
        # embeddings: the encoder (loaded on first use unless load_embed_model ran), or
        # embed_model=DECODER for mean-pooled states of the generating model
        self._embed_model = embed_model
        self._embedder: TorchEmbedder | None = None
        self._embed_load_lock = threading.Lock()
        self._forward_lock = COMPUTE_LOCK  # shared by every engine: see its docstring
        """Held by every forward of the generating model: the scheduler's steps and decoder
        embeddings, so the two never run at once."""

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
        quantized = self._weights_mode != "dequant" and device.type == "cpu"
        if quantized:
            bar.set_description(f"loading {spec.model} (compiling kernels on first use)")
            try:
                kernels()  # compile (or find cached) before committing to the quantized path
            except RuntimeError as e:
                if self._weights_mode == "quantized":
                    raise UnsupportedBackendError(
                        f"{e}; install a C++ compiler and ninja, or pass weights='dequant'"
                    ) from e
                log.warning("%s; weights are dequantized to float instead", e)
                quantized = False
            bar.set_description(f"loading {spec.model}")
        self._quantized = quantized
        prepared = self._prepare_weights(files.weights, device, dtype, bar, quantized)
        ops = TorchOps(device, dtype)
        kv_dtype = self._kv_dtype(device, dtype, quantized)
        per_block = kv_bytes_per_block(
            n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            dtype_bytes=torch.empty((), dtype=kv_dtype).element_size(),
            block_size=self._kv_block_size)
        num_blocks = kv_budget_blocks(self._kv_memory, bytes_per_block=per_block,
                                      available_bytes=_available_memory(device))
        if self._kv_memory == "auto":
            num_blocks = min(num_blocks, AUTO_KV_CAP_BYTES // per_block)
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.shutdown()
            for s in list(self._sessions.values()):
                s.closed, s.backend_state = True, None
            self._sessions.clear()
            # the file's tensors are not kept: only how each one is held
            self._weight_paths = {name: weight_path(raw, quantized)
                                  for name, raw in files.weights.items()}
            self._tokenizer, self._ctx = tokenizer, ctx
            self._model = files.build(prepared, ops)
            self._fused = self._fused_decoder(self._model, device, dtype, kv_dtype)
            self._device, self._dtype = device, dtype
            self._fingerprint = _fingerprint(ckpt, cfg, dtype_name)
            self._cache = PagedKVCache(num_blocks, block_size=self._kv_block_size,
                                       hash_namespace=self._fingerprint)
            self._store = PagedKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks,
                                       self._kv_block_size, device, kv_dtype)
            # The scheduler reaches the engine through weak references, so an engine nobody
            # holds is collected (and its finalizer below stops the thread).
            self._scheduler = Scheduler(
                self._cache, _weakly(self._locked_step), self._store.copy_blocks,
                get_logits=_weakly(self._logits_of), set_logits=_weakly(self._set_logits),
                free_session=_weakly(self._free_session), max_batch=self._max_batch,
                max_step_tokens=self._prefill_chunk, kv_policy=self._kv_policy)
            # Stop the model thread before the interpreter tears down (a thread still inside
            # torch's native code at exit aborts the process) or when the engine is dropped.
            weakref.finalize(self, self._scheduler.shutdown)
            self._handle = ModelHandle(
                name=spec.model, path=str(ckpt.path), architecture=ckpt.architecture,
                vocab_size=cfg.vocab_size, context_length=ctx, n_params=ckpt.n_params,
                quant_types=ckpt.quant_types(), has_chat_template=tokenizer.chat_template
                is not None, eos_token_ids=tuple(sorted(tokenizer.eog_ids)), backend="torch",
                device=str(device), dtype=dtype_name)
        return self._handle

    def _kv_dtype(self, device: torch.device, dtype: torch.dtype,
                  quantized: bool) -> torch.dtype:
        """The KV cache's dtype: kv_dtype, or for "auto" float16 beside the int8 decode kernels
        on the CPU (llama.cpp's default too: half the bytes attention reads per token, at
        float16's ~0.05% rounding), else the compute dtype."""
        if self._kv_dtype_name != "auto":
            return _DTYPES[self._kv_dtype_name]
        int8_decode = self._decode_mode in ("auto", "int8") and quantized
        if int8_decode and device.type == "cpu" and dtype == torch.float32:
            return torch.float16
        return dtype

    def _fused_decoder(self, model: Any, device: torch.device, dtype: torch.dtype,
                       kv_dtype: torch.dtype) -> FusedDecoder | None:
        """The native step for `decode` ("auto": int8 where it can run), or None for the
        op-by-op torch path."""
        mode = self._decode_mode
        if mode == "torch":
            return None
        why = FusedDecoder.supports(model, device, dtype, kv_dtype)
        if why is None:
            try:
                kernels()
            except RuntimeError as e:
                why = str(e)
        if why is not None:
            if mode != "auto":
                raise UnsupportedBackendError(f"decode={mode!r}: {why}; pass decode='torch'")
            return None
        return FusedDecoder(model, int8=mode in ("auto", "int8"))

    def close(self) -> None:
        """Stop the model thread; the engine cannot serve requests afterwards."""
        if self._scheduler is not None:
            self._scheduler.shutdown()

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def weight_paths(self) -> dict[str, str]:
        """How each weight tensor is held: kept quantized (multiplied by the compiled kernel) or
        dequantized to the compute dtype."""
        if self._weight_paths is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return dict(self._weight_paths)

    @staticmethod
    def _prepare_weights(weights: dict[str, RawTensor], device: torch.device,
                         dtype: torch.dtype, bar: tqdm, quantized: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with torch.inference_mode():
            for name, raw in weights.items():
                if weight_path(raw, quantized) == KEPT_QUANTIZED:
                    out[name] = repack(raw)
                    release_pages(raw.data)
                    bar.update(1)
                    continue
                if isinstance(raw.data, torch.Tensor):
                    w = raw.data.to(device=device, dtype=dtype)
                else:
                    data = torch.from_numpy(np.array(raw.data, copy=True)).to(device)
                    w = dequantize(data, raw.qtype, raw.shape).to(dtype)
                    release_pages(raw.data)
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

    # -- embeddings -----------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, truncate: bool = True,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[float]]:
        """One vector per text: the embedding model's (loaded on first use:
        `embed_model`, default all-minilm-l6-v2), or with embed_model="decoder" the mean of the
        generating model's final hidden states, L2-normalized. A text longer than the model
        reads is cut (truncate=True) or raises ContextOverflowError."""
        texts = check_texts(texts)
        check_options(truncate, batch_size)
        if not texts:
            return []
        if self._embed_model == DECODER:
            return self._decoder_embed(texts, truncate, batch_size).tolist()
        return self._get_embedder().embed(texts, truncate=truncate, batch_size=batch_size)

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
        with self._embed_load_lock:
            if model == DECODER:
                self.model  # noqa: B018 - raises unless a generating model is loaded
                self._embedder = None
            else:
                device = self._device_name if self._handle is None else str(self._device)
                self._embedder = TorchEmbedder(model, device=device)
            self._embed_model = model

    def _get_embedder(self) -> TorchEmbedder:
        with self._embed_load_lock:
            if self._embedder is None:
                name = self._embed_model or DEFAULT_EMBED_MODEL
                device = self._device_name if self._handle is None else str(self._device)
                self._embedder = TorchEmbedder(name, device=device)
            return self._embedder

    def _decoder_embed(self, texts: list[str], truncate: bool, batch_size: int) -> np.ndarray:
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

        def locked(fn: Any) -> Any:
            with self._forward_lock:
                return fn()

        return decoder_embeddings(self._model, tokens, self._device, batch_size=batch_size,
                                  run=locked)

    def _locked_step(self, tokens: list[int], positions: list[int],
                     seqs: list[SeqStep]) -> np.ndarray:
        with self._forward_lock:
            return self._run_step(tokens, positions, seqs)

    # -- sessions -------------------------------------------------------------------------------
    def new_session(self) -> Session:
        sched = self._sched()
        s = Session()
        s.backend_state = _SessionState()
        with sched.lock:
            self._cache.allocate(s.id)
            self._sessions[s.id] = s
        return s

    def close_session(self, session: Session) -> None:
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
        """Write the session's tokens and K/V to `path` (a torch file), with a format version
        and the model's fingerprint so another model refuses it."""
        self._state(session)
        session.acquire()
        try:
            with self._sched().lock:
                tokens = list(session.tokens)
                slots = self._cache.slot_mapping(session.id, 0, len(tokens))
            k, v = self._store.read(slots)
            torch.save({"format": SESSION_FORMAT, "model": self._fingerprint, "tokens": tokens,
                        "k": k.cpu(), "v": v.cpu()}, os.fspath(path))
        finally:
            session.release()

    def load_session(self, path: str | os.PathLike[str]) -> Session:
        """A new session holding what `save_session` wrote; it continues exactly where the
        saved one stopped."""
        try:
            data = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise SessionError(f"no saved session at {path}") from e
        except Exception as e:
            raise SessionError(f"{path} is not a saved llama-engine session ({e})") from e
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise SessionError(
                f"{path} is not a {SESSION_FORMAT} session file; save it again with this version")
        if data.get("model") != self._fingerprint:
            raise SessionError(
                f"{path} was saved from another model ({data.get('model')!r}); load it into an "
                f"engine running that model (this one runs {self._fingerprint!r})")
        tokens = [int(t) for t in data["tokens"]]
        s = Session()
        s.backend_state = _SessionState()
        with self._sched().lock:
            blocks = self._cache.import_session(s.id, tokens)
            bs = self._cache.block_size
            slots = [blocks[p // bs] * bs + p % bs for p in range(len(tokens))]
            self._store.write(slots, data["k"].to(self._device), data["v"].to(self._device))
            s.tokens = tokens
            self._sessions[s.id] = s
        return s

    def _free_session(self, session: Session) -> None:
        """Called with the scheduler lock held."""
        if self._sessions.pop(session.id, None) is not None:
            self._cache.free(session.id)
        session.closed = True
        session.backend_state = None
        session.tokens = []

    def stats(self) -> dict[str, Any]:
        if self._scheduler is None and self._embedder is not None:  # an embeddings-only engine
            return {"kv_blocks_total": 0, "kv_blocks_free": 0, "kv_blocks_cached": 0,
                    "kv_blocks_used": 0, "sessions_active": 0, "requests_running": 0,
                    "requests_waiting": 0}
        sched = self._sched()
        with sched.lock:
            kv = self._cache.stats()
            return {
                **kv,
                "kv_block_tokens": self._cache.block_size,
                "kv_bytes_total": self._store.nbytes,
                "kv_dtype": str(self._store.k.dtype).removeprefix("torch."),
                "sessions_active": len(self._sessions),
                "requests_running": sched.running(),
                "requests_waiting": sched.waiting(),
            }

    def _sched(self) -> Scheduler:
        if self._scheduler is None:
            raise SessionError("no model is loaded; call load_model() or use create_engine()")
        return self._scheduler

    def _state(self, session: Session) -> _SessionState:
        if session.closed or session.backend_state is None:
            raise SessionError(
                f"session {session.id} is closed; create a new one with new_session()")
        if self._sessions.get(session.id) is not session:
            raise SessionError(f"session {session.id} does not belong to this engine")
        return session.backend_state

    def _logits_of(self, session: Session) -> np.ndarray | None:
        st = session.backend_state
        if st is None or st.logits_len != len(session.tokens):
            return None
        return st.logits

    def _set_logits(self, session: Session, logits: np.ndarray) -> None:
        st = session.backend_state
        if st is not None:
            st.logits, st.logits_len = logits, len(session.tokens)

    # -- compute (the scheduler thread only) ------------------------------------------------------
    def _run_step(self, tokens: list[int], positions: list[int],
                  seqs: list[SeqStep]) -> np.ndarray:
        with torch.inference_mode():
            fused = self._fused
            if fused is None:
                return self._forward(tokens, positions, seqs).numpy()
            # Generated tokens take the decode kernel (int8 by default); prompt chunks the exact
            # one, which is also the faster of the two for many rows.
            starts = np.cumsum([0] + [s.n_new for s in seqs])
            dec = [i for i, s in enumerate(seqs) if s.decoding]
            rest = [i for i, s in enumerate(seqs) if not s.decoding]
            parts: dict[int, np.ndarray] = {}
            for group, int8 in ((dec, None), (rest, False)):
                if not group:
                    continue
                logits = fused.step(
                    [t for i in group for t in tokens[starts[i]:starts[i + 1]]],
                    [p for i in group for p in positions[starts[i]:starts[i + 1]]],
                    [seqs[i] for i in group], self._store, int8=int8).numpy()
                wanted = [i for i in group if seqs[i].want_logits]
                parts.update(zip(wanted, logits, strict=True))
            if len(parts) == 0:
                return np.zeros((0, self.model.vocab_size), dtype=np.float32)
            return np.stack([parts[i] for i, s in enumerate(seqs) if s.want_logits])

    def _forward(self, tokens: list[int], positions: list[int],
                 seqs: list[SeqStep]) -> torch.Tensor:
        """The op-by-op forward (prompt chunks, and every step when decode='torch')."""
        dev = self._device
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        logits = self._model.forward(ids, pos, StepBatch(self._store, seqs))
        return logits.float().cpu()

    # -- requests ---------------------------------------------------------------------------------
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

    def _request_stream(self, session: Session | None, prompt: list[int] | None,
                        params: SamplingParams, *, own: bool) -> TokenStream:
        if session is not None:
            session.acquire()  # fail now, in the caller's frame, if it is busy or closed
            session.release()
        deadline = None if params.timeout is None else time.perf_counter() + params.timeout

        def make_generation(usage: Usage, started_at: float) -> Generation:
            assert req_session is not None
            return Generation(self.tokenizer, params, req_session.tokens, usage=usage,
                              started_at=started_at, context_length=self._ctx)

        req_session = session

        def steps(cancel: threading.Event) -> Iterator[StreamChunk]:
            nonlocal req_session
            s = self.new_session() if own else session
            assert s is not None
            req_session = s
            s.acquire()
            req = Request(session=s, prompt=prompt, make_generation=make_generation,
                          own_session=own, deadline=deadline, cancel=cancel)
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

        return TokenStream(steps)


_RELEASE_WAIT_S = 10.0


def _weakly(method: Any) -> Any:
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        if bound is None:
            raise SessionError("the engine was closed")
        return bound(*args, **kwargs)

    return call


def _fingerprint(ckpt: Any, cfg: Any, dtype: str) -> str:
    """Names the model a KV cache belongs to: file name and size, configuration, dtype."""
    import hashlib

    size = ckpt.path.stat().st_size if ckpt.path.is_file() else ckpt.n_params
    text = f"{ckpt.path.name}:{size}:{cfg!r}:{dtype}"
    return f"{ckpt.architecture}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
