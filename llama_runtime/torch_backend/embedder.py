"""Sentence embeddings on torch: a BERT-family encoder, or mean-pooled decoder states.

`TorchEmbedder` runs a sentence-transformers model (e.g. all-minilm-l6-v2) the way
sentence-transformers does: texts tokenized with the model's own tokenizer, cut at its
`max_seq_length` (special tokens kept), sorted by length so each batch pads little, one padded
forward per batch with an attention mask, then the model's own pooling and normalization.

`decoder_embeddings` mean-pools the final-normed hidden states of a generating (Llama-family)
model over each text's tokens and L2-normalizes them. Its attention reads the batch's own keys
(`CausalBatch`), never the paged KV cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llama_engine import ContextOverflowError, InvalidParamsError
from llama_models import open_encoder
from llama_runtime.backends import pick_device
from llama_runtime.compute import COMPUTE_LOCK, DEFAULT_BATCH_SIZE, check_options, check_texts
from llama_runtime.torch_backend.ops import TorchOps
from llama_tokenizer import Tokenizer

__all__ = ["CausalBatch", "TorchEmbedder", "decoder_embeddings"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first, in chunks of `batch_size` (little padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class TorchEmbedder:
    """A sentence-transformers (or plain HF BERT) model on one torch device.

    Thread-safe: calls are serialized by a lock (one forward already uses every CPU thread).
    """

    def __init__(self, model: str = "all-minilm-l6-v2", *, device: str = "auto",
                 dtype: str = "float32", threads: int | None = None) -> None:
        if dtype not in _DTYPES:
            raise InvalidParamsError(
                f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InvalidParamsError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        files = open_encoder(model)
        st = files.sentence
        assert st.transformer_dir is not None
        self.name = model
        self.dim = files.dim
        self.max_seq_length = st.max_seq_length
        self.pooling, self.normalize = st.pooling, st.normalize
        self.device = torch.device(pick_device(device))
        self.dtype = _DTYPES[dtype]
        self.tokenizer = Tokenizer.from_hf_dir(st.transformer_dir)
        self._lower = st.do_lower_case
        self._prefix, self._suffix = _special_frame(self.tokenizer)
        pad = files.checkpoint.metadata.get("pad_token_id")
        self._pad_id = pad if isinstance(pad, int) and 0 <= pad < files.config.vocab_size else 0
        with torch.inference_mode():
            prepared = {name: raw.data.to(device=self.device, dtype=self.dtype).contiguous()
                        for name, raw in files.weights.items()}
        self._model = files.build(prepared, TorchOps(self.device, self.dtype))
        self._lock = COMPUTE_LOCK

    def __repr__(self) -> str:
        return (f"TorchEmbedder({self.name!r}, dim={self.dim}, device={self.device}, "
                f"pooling={'+'.join(self.pooling)}, normalize={self.normalize})")

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[list[int]]:
        """Token ids per text, special tokens included, as sentence-transformers makes them:
        at most `max_seq_length` ids, the text's own tokens cut from the end when longer.
        With truncate=False a longer text raises ContextOverflowError instead."""
        texts = check_texts(texts)
        budget = max(0, self.max_seq_length - len(self._prefix) - len(self._suffix))
        out: list[list[int]] = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text.lower() if self._lower else text,
                                        add_special=False)
            if len(ids) > budget:
                if not truncate:
                    raise ContextOverflowError(
                        f"texts[{i}] is {len(ids) + len(self._prefix) + len(self._suffix)} "
                        f"tokens but {self.name} reads at most {self.max_seq_length}; shorten "
                        "it, split it, or pass truncate=True to embed its first "
                        f"{self.max_seq_length} tokens")
                ids = ids[:budget]
            out.append([*self._prefix, *ids, *self._suffix])
        return out

    def embed(self, texts: Sequence[str], *, truncate: bool = True,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[float]]:
        """One embedding (a list of `dim` floats) per text, in the order given."""
        return self.embed_array(texts, truncate=truncate, batch_size=batch_size).tolist()

    def embed_array(self, texts: Sequence[str], *, truncate: bool = True,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Like `embed`, as a float32 array [len(texts), dim]."""
        check_options(truncate, batch_size)
        ids = self.tokenize(texts, truncate=truncate)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for rows in _length_batches([len(x) for x in ids], batch_size):
            out[rows] = self._embed_batch([ids[i] for i in rows])
        return out

    def _embed_batch(self, seqs: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=bool)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = True
        with self._lock, torch.inference_mode():
            emb = self._model.embed(torch.from_numpy(ids).to(self.device),
                                    torch.from_numpy(mask).to(self.device))
            return emb.float().cpu().numpy()


def _special_frame(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The special ids `encode(add_special=True)` puts before and after a text's own tokens
    ([CLS] and [SEP] for BERT), found by encoding a probe both ways."""
    probe = "hello world"
    plain = tok.encode(probe, add_special=False)
    full = tok.encode(probe, add_special=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []  # the post-processor rewrites the text's tokens: add nothing


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
    for rows in _length_batches([len(t) for t in token_lists], batch_size):
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
