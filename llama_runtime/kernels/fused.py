"""The fused step (csrc/decode.cpp) as one object: a model in the library over weights it borrows,
and a step over numpy arrays (embedded rows in, logits or hidden states out, K/V written in place
in the paged store). Both backends drive it: the native one over numpy weights, the torch one
over its tensors' memory."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from llama_models.decoder import LAYER_EXTRAS, DecoderConfig, local_rope
from llama_models.ops import RopeSpec
from llama_runtime.kernels.api import check, ptr
from llama_runtime.kernels.library import (
    ACTIVATIONS,
    ACTS,
    DECODE_MODES,
    LeWeight,
    StepArgs,
    library,
)
from llama_runtime.step import RopeTables, SeqStep, row_arrays

__all__ = ["LAYER_LINEARS", "FusedModel", "decoder_embeddings"]

LAYER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
"""A layer's products in the order le_model_new takes them (GGUF names after "blk.N.")."""


class FusedModel:
    """cfg's model in the library. norms: each layer's attn_norm and ffn_norm, then the output
    norm (pointers to cfg.dim float32 values, copied); weights: each layer's LAYER_LINEARS, then
    the output projection (borrowed); extras: LAYER_EXTRAS a layer, a pointer or None (copied).
    `keep` holds what the weights point into for as long as this model lives."""

    def __init__(self, cfg: DecoderConfig, rope: RopeSpec, *, norms: Sequence[int],
                 weights: Sequence[LeWeight], extras: Sequence[int | None],
                 keep: list[Any]) -> None:
        self._lib = library()
        self.cfg = cfg
        self._keep = keep
        dims = (ctypes.c_int64 * 7)(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                                    cfg.head_dim, cfg.ffn_dim, cfg.vocab_size)
        windows = (ctypes.c_int64 * len(cfg.windows))(*cfg.windows)
        handle = self._lib.le_model_new(
            dims, cfg.norm_eps, cfg.attn_scale, ACTIVATIONS[cfg.activation], windows,
            len(cfg.windows), (ctypes.c_void_p * len(norms))(*norms), len(norms),
            (LeWeight * len(weights))(*weights), len(weights),
            (ctypes.c_void_p * len(extras))(*extras), len(extras))
        if not handle:
            raise ValueError(self._lib.le_error().decode())
        self._handle = handle
        self._rope = RopeTables(rope, local_rope(cfg, rope))

    @classmethod
    def from_layers(cls, cfg: DecoderConfig, rope: RopeSpec, *,
                    norm: Callable[[int | None, str], np.ndarray],
                    weight: Callable[[int | None, str], LeWeight],
                    extra: Callable[[int, str], np.ndarray | None],
                    keep: list[Any]) -> FusedModel:
        """The model from its tensors, asked for in the order le_model_new takes them: each
        layer i's norm(i, "attn_norm") and norm(i, "ffn_norm") (float32 arrays of cfg.dim),
        weight(i, key) for key in LAYER_LINEARS and extra(i, key) for key in LAYER_EXTRAS (an
        array, or None where the layer has none); then norm(None, "output_norm") and
        weight(None, "output"). The sizes of norms and extras are checked here; `keep` holds
        what the weights point into."""
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        extra_sizes = dict(zip(LAYER_EXTRAS, (q, kv, kv, cfg.head_dim, cfg.head_dim, cfg.dim,
                                              cfg.dim), strict=True))

        def held(a: np.ndarray, size: int, what: str) -> int:
            a = np.ascontiguousarray(a, dtype=np.float32)
            if a.size != size:
                raise ValueError(f"{what} holds {a.size} values, expected {size}")
            keep.append(a)
            return int(a.ctypes.data)

        norms: list[int] = []
        weights: list[LeWeight] = []
        extras: list[int | None] = []
        for i in range(cfg.n_layers):
            norms += [held(norm(i, key), cfg.dim, f"layer {i}'s {key}")
                      for key in ("attn_norm", "ffn_norm")]
            weights += [weight(i, key) for key in LAYER_LINEARS]
            for key in LAYER_EXTRAS:
                a = extra(i, key)
                extras.append(None if a is None else
                              held(a, extra_sizes[key], f"layer {i}'s {key}"))
        norms.append(held(norm(None, "output_norm"), cfg.dim, "output_norm"))
        weights.append(weight(None, "output"))
        return cls(cfg, rope, norms=norms, weights=weights, extras=extras, keep=keep)

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.le_model_free(handle)

    def run(self, x: np.ndarray, positions: Sequence[int], seqs: Sequence[SeqStep],
            k: np.ndarray, v: np.ndarray, *, decode: str, hidden: bool = False) -> np.ndarray:
        """One forward of the embedded rows x [B, dim] (every sequence's new tokens, in order)
        over the paged K/V arrays [layers, blocks, kv_heads, block_size, head_dim]: logits
        [sequences wanting them, vocab], or with `hidden` the final-normed hidden states
        [B, dim] of every row. decode: a key of DECODE_MODES."""
        cfg = self.cfg
        if (k.ndim != 5 or k.shape != v.shape or k.dtype != v.dtype
                or k.shape[0] != cfg.n_layers or k.shape[2] != cfg.n_kv_heads
                or k.shape[4] != cfg.head_dim or not k.flags.c_contiguous
                or not v.flags.c_contiguous):
            raise ValueError(f"a KV store of shape {k.shape} does not fit this model")
        if x.shape != (len(positions), cfg.dim) or x.dtype != np.float32:
            raise ValueError(f"x must be float32 [{len(positions)}, {cfg.dim}]")
        block_size = k.shape[3]
        rows = row_arrays(positions, seqs, block_size)
        x = np.ascontiguousarray(x)
        cos, sin, *local = self._rope(rows.positions)
        wanted = np.arange(len(x), dtype=np.int64) if hidden else rows.logit_rows
        out = np.empty((len(wanted), cfg.dim if hidden else cfg.vocab_size), dtype=np.float32)
        generated, prompt = DECODE_MODES[decode]
        args = StepArgs(
            ptr(x), ptr(cos), ptr(sin), ptr(rows.write_slots), ptr(rows.block_tables),
            rows.block_tables.shape[1], ptr(rows.ctx_lens), len(x), ptr(k), ptr(v),
            k.dtype == np.float16, k.shape[1] * block_size, block_size, ptr(wanted),
            len(wanted), ACTS[generated], ACTS[prompt], rows.generated_rows,
            None if hidden else ptr(out), ptr(out) if hidden else None,
            *(ptr(t) for t in local))
        check(self._lib.le_model_step(self._handle, ctypes.byref(args)))
        return out

    def mean_hidden(self, x: np.ndarray, *, chunk: int = 512) -> np.ndarray:
        """float32 [dim]: the mean final-normed hidden state over the embedded rows x [n, dim]
        of one text, L2-normalized (decoder embeddings), with the exact kernels over a scratch
        cache, `chunk` rows a step (so the work buffers stay prompt-sized)."""
        from llama_runtime.kv_store import HostKVStore

        cfg, bs, n = self.cfg, 16, len(x)
        store = HostKVStore(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, -(-n // bs), bs,
                            "float32")
        total = np.zeros(cfg.dim, dtype=np.float64)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            seq = SeqStep(start=start, n_new=end - start, write_slots=list(range(start, end)),
                          context_slots=list(range(end)), want_logits=True)
            h = self.run(x[start:end], list(range(start, end)), [seq], store.k, store.v,
                         decode="exact", hidden=True)
            total += h.sum(axis=0, dtype=np.float64)
        mean = (total / n).astype(np.float32)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def set_threads(self, threads: int) -> None:
        """The kernels' thread count is process-wide: each engine sets its own before its
        forwards (which the compute lock serialises)."""
        self._lib.le_set_threads(threads)

    def set_profiling(self, on: bool) -> None:
        """Time each phase of the steps after this (bench/decode_profile.py); clears the
        totals."""
        self._lib.le_model_set_profiling(self._handle, int(on))

    def profile(self) -> dict[str, float]:
        """Phase -> microseconds over the steps run since profiling was turned on."""
        size = self._lib.le_model_profile(self._handle, None, 0)
        buf = ctypes.create_string_buffer(size)
        self._lib.le_model_profile(self._handle, buf, size)
        pairs = (line.rsplit(" ", 1) for line in buf.raw.decode().splitlines())
        return {phase: float(us) for phase, us in pairs}


def decoder_embeddings(fused: FusedModel, embed: Callable[[Sequence[int]], np.ndarray],
                       tokens: Sequence[Sequence[int]], *, chunk: int, threads: int,
                       lock: AbstractContextManager[Any]) -> np.ndarray:
    """Decoder embeddings of each token list (FusedModel.mean_hidden of its embedded rows),
    one text at a time, each holding `lock` (never beside a scheduler step, nor a reload)."""
    out = []
    for ids in tokens:
        with lock:
            fused.set_threads(threads)
            out.append(fused.mean_hidden(embed(ids), chunk=chunk))
    return np.stack(out)
