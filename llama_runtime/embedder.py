"""Sentence embeddings with a BERT-family encoder (all-minilm-l6-v2, BGE, E5, ...), the way
sentence-transformers computes them: texts tokenized with the model's own tokenizer, cut at its
`max_seq_length` (special tokens kept), sorted by length so each batch pads little, one padded
forward per batch with an attention mask, then the model's own pooling and normalization.

The forward runs on an `Encoder`: the kernels over numpy on a CPU (native/encoder.py, no torch),
torch (torch_backend/embedder.py) for CUDA and other dtypes, or MLX (mlx_backend/encoder.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llama_engine import ContextOverflowError, InvalidParamsError, UnsupportedBackendError
from llama_models import open_encoder
from llama_models.bert import EncoderFiles
from llama_runtime.compute import COMPUTE_LOCK, DEFAULT_BATCH_SIZE, check_options, check_texts
from llama_tokenizer import Tokenizer

__all__ = ["Encoder", "SentenceEmbedder", "length_batches"]

ENCODER_BACKENDS = ("auto", "native", "torch", "mlx")
_DTYPES = ("float32", "bfloat16", "float16")


class Encoder(Protocol):
    """A loaded encoder's forward: ids, mask [B, T] (int64, bool; padding on the right) ->
    pooled (and normalized) sentence embeddings, float32 [B, dim]."""

    backend: str  # (a class attribute) "native", "torch" or "mlx"
    device: str

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first, in chunks of `batch_size` (little padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]



def make_encoder(files: EncoderFiles, *, backend: str, device: str, dtype: str,
                 threads: int | None) -> Encoder:
    """The native encoder for a float32 run on the CPU ("auto" on a machine without a GPU),
    MLX's for backend="mlx" or device="metal", else torch's (each imported only then)."""
    if backend not in ENCODER_BACKENDS:
        raise InvalidParamsError(
            f"backend must be one of {', '.join(ENCODER_BACKENDS)}, got {backend!r}")
    from llama_runtime.backends import METAL_DEVICES, runs_on_cpu

    if backend == "mlx" or (backend == "auto" and device in METAL_DEVICES):
        from llama_runtime.mlx_backend import mlx_installed

        if not mlx_installed():
            raise UnsupportedBackendError(
                "an MLX sentence encoder needs mlx: pip install 'llama-engine[mlx]' (on Linux: "
                "pip install 'mlx[cpu]')")
        from llama_runtime.mlx_backend.encoder import MLXEncoder

        return MLXEncoder(files, device=device, dtype=dtype)
    native_fits = dtype == "float32" and runs_on_cpu(device)
    if backend == "native" or (backend == "auto" and native_fits):
        if not native_fits:
            raise UnsupportedBackendError(
                f"the native encoder runs on the CPU in float32, not {device}/{dtype}; pass "
                "backend='torch'")
        from llama_runtime.native.encoder import NativeEncoder

        return NativeEncoder(files, threads=threads)
    from llama_runtime.backends import require_torch

    require_torch("an embedding model on a GPU or in half precision")
    from llama_runtime.torch_backend.embedder import TorchEncoder

    return TorchEncoder(files, device=device, dtype=dtype, threads=threads)


class SentenceEmbedder:
    """A sentence-transformers (or plain HF BERT) model, on the kernels over numpy on a CPU, on
    torch (backend="torch", or a GPU / half-precision run) or on MLX (backend="mlx", or
    device="metal").

    Thread-safe: calls are serialized by the compute lock (one forward already uses every CPU
    thread).
    """

    def __init__(self, model: str = "all-minilm-l6-v2", *, backend: str = "auto",
                 device: str = "auto", dtype: str = "float32",
                 threads: int | None = None) -> None:
        if dtype not in _DTYPES:
            raise InvalidParamsError(
                f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        from llama_runtime.backends import check_threads

        check_threads(threads)
        files = open_encoder(model)
        st = files.sentence
        assert st.transformer_dir is not None
        self.name = model
        self.dim = files.dim
        self.max_seq_length = st.max_seq_length
        self.pooling, self.normalize = st.pooling, st.normalize
        self.tokenizer = Tokenizer.from_hf_dir(st.transformer_dir)
        self._lower = st.do_lower_case
        self._prefix, self._suffix = _special_frame(self.tokenizer)
        pad = files.checkpoint.metadata.get("pad_token_id")
        self._pad_id = pad if isinstance(pad, int) and 0 <= pad < files.config.vocab_size else 0
        self._encoder = make_encoder(files, backend=backend, device=device, dtype=dtype,
                                     threads=threads)
        self.backend = type(self._encoder).backend
        self.device = self._encoder.device
        self._lock = COMPUTE_LOCK

    def __repr__(self) -> str:
        return (f"SentenceEmbedder({self.name!r}, dim={self.dim}, backend={self.backend}, "
                f"device={self.device}, pooling={'+'.join(self.pooling)}, "
                f"normalize={self.normalize})")

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
        for rows in length_batches([len(x) for x in ids], batch_size):
            out[rows] = self._embed_batch([ids[i] for i in rows])
        return out

    def _embed_batch(self, seqs: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=bool)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = True
        with self._lock:
            return self._encoder.embed(ids, mask)


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


