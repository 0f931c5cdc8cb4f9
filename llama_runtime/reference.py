"""The reference every backend is gated against: the model's float32 forward, op by op, on the
CPU in numpy, with every weight dequantized to float32 (exactly the stored values), under the
same model definition (llama_models' DecoderModel over `ReferenceOps`).

It is slow and holds float32 weights (4 bytes a parameter), so it serves the parity gate's few
prompts only; `greedy` batches them, one row per prompt a step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from llama_models import ModelFiles
from llama_models.checkpoint import dense_float32
from llama_runtime.step import HeadRotary

__all__ = ["ReferenceModel", "ReferenceOps", "ReferenceRun", "reference_run"]


class ReferenceOps:
    """The decoder operations of `Ops` on float32 numpy arrays [N, features]."""

    def __init__(self) -> None:
        self.rotary = HeadRotary()

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x @ weight.T

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return x / np.sqrt(ms + np.float32(eps)) * weight

    def rope(self, x: np.ndarray, rot: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        cos, sin = rot
        half = x.shape[-1] // 2
        rotated = np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
        return x * cos + rotated * sin

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Any, layer: int,
                  scale: float, *, window: int = 0) -> np.ndarray:
        return batch.attend(q, k, v, layer, scale, window=window)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return x / (np.float32(1.0) + np.exp(-x))

    def gelu(self, x: np.ndarray, approximate: bool = False) -> np.ndarray:
        if not approximate:
            raise NotImplementedError("the reference decoder's GELU is the tanh one")
        c = np.float32(math.sqrt(2.0 / math.pi))
        return np.float32(0.5) * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))

    def take_rows(self, x: np.ndarray, batch: Any) -> np.ndarray:
        return x[batch.logits_rows]


class _Batch:
    """One forward's rows: `spans[i]` rows of sequence i (prompt, or its one new token), each
    sequence's K/V kept whole per layer, in `cache`."""

    def __init__(self, cache: list[list[tuple[np.ndarray, np.ndarray]]],
                 spans: list[tuple[int, int]]) -> None:
        self.cache, self.spans = cache, spans
        self.logits_rows = np.array([r1 - 1 for _, r1 in spans])

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, layer: int, scale: float, *,
               window: int = 0) -> np.ndarray:
        out = np.empty_like(q)
        group = q.shape[1] // k.shape[1]
        for seq, (r0, r1) in enumerate(self.spans):
            old_k, old_v = self.cache[seq][layer]
            keys = np.concatenate((old_k, k[r0:r1]))
            values = np.concatenate((old_v, v[r0:r1]))
            self.cache[seq][layer] = (keys, values)
            n, t = r1 - r0, len(keys)
            pos_q = np.arange(t - n, t)[:, None]
            pos_k = np.arange(t)[None, :]
            seen = pos_k <= pos_q
            if window:
                seen &= pos_k > pos_q - window
            kh = np.repeat(keys, group, axis=1).transpose(1, 2, 0)  # [H, D, T]
            vh = np.repeat(values, group, axis=1).transpose(1, 0, 2)  # [H, T, D]
            scores = np.matmul(q[r0:r1].transpose(1, 0, 2), kh) * np.float32(scale)
            scores = np.where(seen[None], scores, np.float32(-np.inf))
            scores -= scores.max(-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(-1, keepdims=True)
            out[r0:r1] = np.matmul(weights, vh).transpose(1, 0, 2)
        return out.reshape(q.shape[0], -1)


TOP = 16
"""Logits kept of each later step: the best TOP (enough to tell a near-tie)."""


@dataclass(frozen=True, slots=True)
class ReferenceRun:
    """The reference's greedy continuation of each prompt: `tokens` [prompts, steps], its
    logits after each prompt (`first` [prompts, vocab]), and at every step its best TOP token
    ids and logits (`top_ids`, `top_logits` [prompts, steps, TOP], best first)."""

    tokens: np.ndarray
    first: np.ndarray
    top_ids: np.ndarray
    top_logits: np.ndarray

    def margin(self, prompt: int, step: int, token: int) -> float | None:
        """How far below the reference's best logit at that step `token`'s is, or None when
        it is not among the best TOP."""
        ids = self.top_ids[prompt, step]
        hit = np.flatnonzero(ids == token)
        if not len(hit):
            return None
        return float(self.top_logits[prompt, step, 0] - self.top_logits[prompt, step, hit[0]])

    def save(self, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, tokens=self.tokens, first=self.first, top_ids=self.top_ids,
                     top_logits=self.top_logits)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceRun:
        with np.load(path) as f:
            return cls(f["tokens"], f["first"], f["top_ids"], f["top_logits"])


class ReferenceModel:
    """A model's float32 forward on numpy (see the module docstring)."""

    def __init__(self, files: ModelFiles, context: int | None = None) -> None:
        """`context`: the context length of the engine it stands for (LongRoPE picks its
        factors by it); default the model's own."""
        files = replace(files, rope=files.rope.for_context(context or files.config.context_length))
        weights = {name: dense_float32(raw) for name, raw in files.weights.items()}
        self.cfg = files.config
        self._model = files.build(weights, ReferenceOps())

    def greedy(self, prompts: list[list[int]], n: int) -> ReferenceRun:
        """`n` greedy tokens after each prompt, all prompts a step."""
        cfg = self.cfg
        empty = (np.zeros((0, cfg.n_kv_heads, cfg.head_dim), np.float32),) * 2
        cache = [[empty] * cfg.n_layers for _ in prompts]
        tokens = np.zeros((len(prompts), n), dtype=np.int64)
        top_ids = np.zeros((len(prompts), n, TOP), dtype=np.int64)
        top_logits = np.zeros((len(prompts), n, TOP), dtype=np.float32)
        first = np.zeros((len(prompts), cfg.vocab_size), dtype=np.float32)
        rows = [list(p) for p in prompts]
        starts = [0] * len(prompts)
        for step in range(n):
            ends = np.cumsum([len(r) for r in rows])
            spans = list(zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True))
            ids = np.array([t for r in rows for t in r], dtype=np.int64)
            positions = np.array([s + i for s, r in zip(starts, rows, strict=True)
                                  for i in range(len(r))], dtype=np.int64)
            out = np.asarray(self._model.forward(ids, positions, _Batch(cache, spans)),
                             dtype=np.float32)
            if step == 0:
                first[:] = out
            best = np.argsort(-out, axis=1, kind="stable")[:, :TOP]
            top_ids[:, step] = best
            top_logits[:, step] = np.take_along_axis(out, best, axis=1)
            tokens[:, step] = best[:, 0]
            for i, r in enumerate(rows):
                starts[i] += len(r)
            rows = [[int(t)] for t in tokens[:, step]]
        return ReferenceRun(tokens, first, top_ids, top_logits)


def reference_run(model_path: str, prompts: list[list[int]], n: int, cache: Path, *,
                  context: int) -> ReferenceRun:
    """The reference's run on `prompts`, from `cache` when it is there, else computed in a child
    process (its float32 weights never count in this process's memory) and cached."""
    if cache.exists():
        try:
            run = ReferenceRun.load(cache)
            if run.tokens.shape == (len(prompts), n):
                return run
        except (OSError, ValueError, KeyError):
            pass
    cache.parent.mkdir(parents=True, exist_ok=True)
    job = json.dumps({"model": model_path, "prompts": prompts, "n": n, "out": str(cache),
                      "context": context})
    # one BLAS thread: its products are a few rows each, which threads only slow down (and the
    # parent's own threads share the cores)
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llama_runtime.reference"], input=job,
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the float32 reference failed: {tail[0]}")
    return ReferenceRun.load(cache)


def _main() -> None:
    """Child process: read a job (JSON on stdin), compute, save."""
    from llama_models import open_model

    job = json.loads(sys.stdin.read())
    model = ReferenceModel(open_model(job["model"]), context=job["context"])
    run = model.greedy(job["prompts"], job["n"])
    run.save(Path(job["out"]))


if __name__ == "__main__":
    _main()
