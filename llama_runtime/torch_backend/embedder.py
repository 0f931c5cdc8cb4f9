"""Embeddings on torch: a BERT-family encoder's forward (`TorchEncoder`, for
llama_runtime.embedder.SentenceEmbedder), or mean-pooled decoder states.

`decoder_embeddings` mean-pools the final-normed hidden states of a generating model over each
text's tokens and L2-normalizes them. Its attention reads the batch's own keys (`CausalBatch`),
never the paged KV cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llama_models.bert import EncoderFiles
from llama_runtime.backends import pick_device
from llama_runtime.compute import DEFAULT_BATCH_SIZE
from llama_runtime.embedder import length_batches
from llama_runtime.torch_backend.ops import TorchOps, float_tensor

__all__ = ["CausalBatch", "TorchEncoder", "decoder_embeddings"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchEncoder:
    """A BERT-family encoder on one torch device (llama_runtime.embedder.SentenceEmbedder runs
    it for a GPU or half precision, or when asked for backend="torch")."""

    backend = "torch"

    def __init__(self, files: EncoderFiles, *, device: str = "auto", dtype: str = "float32",
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self._device = torch.device(pick_device(device))
        self.device = str(self._device)
        self._dtype = _DTYPES[dtype]
        with torch.inference_mode():
            prepared = {name: float_tensor(raw).to(device=self._device, dtype=self._dtype)
                        for name, raw in files.weights.items()}
        self._model = files.build(prepared, TorchOps(self._device, self._dtype))

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            emb = self._model.embed(torch.from_numpy(ids).to(self._device),
                                    torch.from_numpy(mask).to(self._device))
            return emb.float().cpu().numpy()


class CausalBatch:
    """A `batch` for DecoderModel.forward over whole sequences laid end to end: each attends
    causally to its own keys (the last `window` of them in a windowed layer), nothing touches
    the KV cache, and every row comes out."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.spans = list(itertools.pairwise(np.cumsum([0, *lengths]).tolist()))
        self.logits_rows = slice(None)  # take_rows: all of them

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               scale: float, *, window: int = 0) -> torch.Tensor:
        # q: [N, Hq, D]; k, v: [N, Hkv, D]
        out = torch.empty_like(q)
        for r0, r1 in self.spans:
            mask = None
            if window and r1 - r0 > window:
                n = r1 - r0
                mask = torch.ones((n, n), dtype=torch.bool, device=q.device).tril()
                mask = mask.triu(1 - window)
            o = F.scaled_dot_product_attention(
                q[r0:r1].transpose(0, 1)[None], k[r0:r1].transpose(0, 1)[None],
                v[r0:r1].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                scale=scale, enable_gqa=True)
            out[r0:r1] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)


def decoder_embeddings(model: Any, token_lists: Sequence[Sequence[int]], device: torch.device,
                       *, batch_size: int = DEFAULT_BATCH_SIZE,
                       run: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
                       ) -> np.ndarray:
    """Mean of the final-normed hidden states over each token list, L2-normalized: float32
    [len(token_lists), dim]. `run(fn)` calls fn (a forward); the engine passes one that holds
    its forward lock, so these forwards never overlap the scheduler's."""
    run = run or (lambda fn: fn())
    out: np.ndarray | None = None
    for rows in length_batches([len(t) for t in token_lists], batch_size):
        seqs = [list(token_lists[i]) for i in rows]
        lengths = [len(s) for s in seqs]
        flat = [t for s in seqs for t in s]
        positions = [p for n in lengths for p in range(n)]

        def forward(flat: list[int] = flat, positions: list[int] = positions,
                    lengths: list[int] = lengths) -> torch.Tensor:
            with torch.inference_mode():
                ids = torch.tensor(flat, dtype=torch.long, device=device)
                pos = torch.tensor(positions, dtype=torch.long, device=device)
                h = model.forward(ids, pos, CausalBatch(lengths), hidden=True).float()
                seg = torch.repeat_interleave(
                    torch.arange(len(lengths), device=device),
                    torch.tensor(lengths, device=device))
                sums = torch.zeros((len(lengths), h.shape[1]), device=device).index_add_(0, seg, h)
                means = sums / torch.tensor(lengths, device=device, dtype=torch.float32)[:, None]
                return F.normalize(means, p=2.0, dim=-1).cpu()

        emb = run(forward).numpy()
        if out is None:
            out = np.zeros((len(token_lists), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    assert out is not None, "no texts"
    return out
