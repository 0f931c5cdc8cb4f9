"""Numeric helpers shared by the processors and the sampler: 1-D numpy, no full sorts."""

from __future__ import annotations

import math

import numpy as np

NEG_INF = -np.inf
# Candidate sets up to this size are sorted outright; larger ones are narrowed first.
_SMALL = 4096
# Buckets of `prefix_by_key`, over keys (-log p for top-p) in [0, _KEY_RANGE]; a token with
# -log p > 30 has p < 1e-13, so the tail bucket never matters short of a mass of ~1.
_BUCKETS = 2048
_KEY_RANGE = 30.0
# Fewest buckets (as a multiple of k) for the bucket-max prefilter of `top_k_indices`.
_BUCKETS_PER_K = 4


def keep_only(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A copy of `logits` with every entry but those at `keep` set to -inf."""
    out = np.full_like(logits, NEG_INF)
    out[keep] = logits[keep]
    return out


def finite(logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids, values) of the entries above -inf; ids is None when that is all of them."""
    mask = logits > NEG_INF
    if np.count_nonzero(mask) == logits.size:
        return None, logits
    ids = np.flatnonzero(mask)
    return ids, logits[ids]


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest entries of 1-D `x`, unordered; requires 0 < k < x.size.

    Prefilter: split `x` into strided buckets and take each bucket's max. The k-th largest bucket
    max is <= the k-th largest entry (the k best buckets each hold an entry >= it), so the
    entries >= it include the top k, and there are usually only about k of them.
    """
    n = x.size
    rows = min(64, n // (_BUCKETS_PER_K * k))
    if rows >= 4:
        cols = n // rows
        bucket_max = x[: rows * cols].reshape(rows, cols).max(axis=0)
        if rows * cols < n:  # the tail: one more bucket
            bucket_max = np.append(bucket_max, x[rows * cols:].max())
        threshold = np.partition(bucket_max, bucket_max.size - k)[bucket_max.size - k]
        cand = np.flatnonzero(x >= threshold)
        if cand.size == k:
            return cand
        if k < cand.size <= n // 4:
            return cand[np.argpartition(x[cand], cand.size - k)[cand.size - k:]]
    return np.argpartition(x, n - k)[n - k:]


def prefix_by_key(key: np.ndarray, probs: np.ndarray, mass: float) -> np.ndarray:
    """Positions of the shortest run of entries, taken in increasing `key` order, whose `probs`
    sum to at least `mass` (all of them if they never do); never empty. `key` is about >= 0.

    Small inputs are sorted. Large ones are bucketed by key (`_BUCKETS` buckets over
    [0, `_KEY_RANGE`], the rest in the last one), and only the bucket where the running mass
    reaches `mass` is sorted: O(V) rather than a full sort of the vocabulary.
    """
    if key.size <= _SMALL:
        order = np.argsort(key)  # not stable, but deterministic
        cum = np.cumsum(probs[order], dtype=np.float64)
        return order[: int(np.searchsorted(cum, mass)) + 1]
    buckets = np.clip(key * (_BUCKETS / _KEY_RANGE), 0, _BUCKETS - 1).astype(np.intp)
    cum = np.cumsum(np.bincount(buckets, weights=probs, minlength=_BUCKETS))
    b = min(int(np.searchsorted(cum, mass)), _BUCKETS - 1)
    edge = np.flatnonzero(buckets == b)
    edge = edge[np.argsort(key[edge])]
    need = mass - (float(cum[b - 1]) if b else 0.0)
    n_edge = int(np.searchsorted(np.cumsum(probs[edge], dtype=np.float64), need)) + 1
    return np.concatenate([np.flatnonzero(buckets < b), edge[:n_edge]])


def logsumexp(x: np.ndarray) -> float:
    """log(sum(exp(x))) in float64, stable; -inf entries count as zero."""
    mx = x.max()
    return float(mx) + math.log(float(np.exp(x - mx).sum(dtype=np.float64)))
