"""The fused step: a scheduler step's generated tokens, or its prompt chunks, in one native call.

Decode on a CPU is a few small matrix products per layer; run op by op from Python, the fixed
cost of ~20 torch calls a layer (and gathering each sequence's K/V by slot before attention)
outweighs the arithmetic. `FusedDecoder` hands the whole forward to csrc/decode.cpp instead:
norms, quantized products, RoPE, the KV write, attention read in place from the paged cache,
the MLP and the output projection, with work buffers reused between steps.

Three kernels: "int16" quantizes activations per 32-block to 16-bit integers before each product
(~0.002% relative error per product), "int8" to 8 bits (llama.cpp's CPU scheme: ~0.5% per
product, so a near-tie between two tokens can flip), and "exact" widens the weights to float
(the reference's arithmetic up to summation order). A mode (library.DECODE_MODES) picks one for
prompt rows and one for generated tokens: the default "mixed" runs prompts exactly and
generated tokens in int16 (the float model's greedy tokens). Each row's result depends only on
that row and its role,
so batching never changes a sequence's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llama_models.decoder import DecoderModel, fused_refusal
from llama_runtime.kernels.fused import FusedModel
from llama_runtime.kernels.library import DECODE_MODES, LeWeight
from llama_runtime.step import SeqStep
from llama_runtime.torch_backend.paged import PagedKVStore
from llama_runtime.torch_backend.qweights import QWeight, dense_le_weight

__all__ = ["DECODE_KERNELS", "FusedDecoder"]

DECODE_KERNELS = tuple(DECODE_MODES)


class FusedDecoder:
    """A DecoderModel's torch weights (quantized QWeights, or float32 tensors) in the kernels'
    fused step (kernels/fused.py), which reads them in place."""

    def __init__(self, model: DecoderModel, *, decode: str) -> None:
        keep: list[Any] = []

        def small(t: torch.Tensor) -> np.ndarray:
            return t.detach().to(torch.float32).contiguous().numpy()

        def weight(w: torch.Tensor | QWeight) -> LeWeight:
            if isinstance(w, QWeight):
                keep.extend(w.parts())
                return w.le_weight()
            w = w.detach().contiguous()
            keep.append(w)
            return dense_le_weight(w)

        layers = model.layers
        self._fused = FusedModel.from_layers(
            model.cfg, model.rope, keep=keep,
            norm=lambda i, key: small(model.out_norm if i is None else layers[i][key]),
            weight=lambda i, key: weight(model.output if i is None else layers[i][key]),
            extra=lambda i, key: small(layers[i][key]) if key in layers[i] else None)
        self._model = model
        self._decode = decode  # a key of DECODE_MODES

    @property
    def fused(self) -> FusedModel:
        return self._fused

    @staticmethod
    def supports(model: DecoderModel, device: torch.device, dtype: torch.dtype,
                 kv_dtype: torch.dtype) -> str | None:
        """None when the fused step can run this model here, else why not."""
        if device.type != "cpu" or dtype != torch.float32:
            return "the fused decode step runs on the CPU in float32"
        if kv_dtype not in (torch.float32, torch.float16):
            return "the fused decode step keeps the KV cache in float32 or float16"
        return fused_refusal(model.cfg, model.rope)

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), dim]: the rows the fused step starts from."""
        ids = torch.tensor(list(tokens), dtype=torch.long)
        x = self._model.ops.embedding(self._model.embed, ids)
        if self._model.cfg.embed_scale != 1.0:
            x = x * self._model.cfg.embed_scale
        return x.float().contiguous().numpy()

    def step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[SeqStep],
             store: PagedKVStore, *, decode: str | None = None) -> torch.Tensor:
        """Logits [sequences wanting them, vocab] after one forward of `tokens` (every
        sequence's new tokens, in order: one for a generated token, a chunk for a prompt).
        `decode` overrides the kernel chosen at construction."""
        out = self._fused.run(self.embed(tokens), positions, seqs, store.k.numpy(),
                              store.v.numpy(), decode=decode or self._decode)
        return torch.from_numpy(out)
