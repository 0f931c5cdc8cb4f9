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

import torch

from llama_models.decoder import (
    LAYER_EXTRAS,
    DecoderConfig,
    DecoderModel,
    fused_refusal,
    local_rope,
)
from llama_runtime.native.library import ACTIVATIONS, ACTS, DECODE_MODES
from llama_runtime.step import RopeTables, SeqStep, row_arrays
from llama_runtime.torch_backend.paged import PagedKVStore
from llama_runtime.torch_backend.qweights import QWeight, kernels

__all__ = ["DECODE_KERNELS", "FusedDecoder"]

DECODE_KERNELS = tuple(DECODE_MODES)
_LAYER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class FusedDecoder:
    def __init__(self, model: DecoderModel, *, decode: str) -> None:
        cfg: DecoderConfig = model.cfg
        norms: list[torch.Tensor] = []
        linears: list[list[torch.Tensor]] = []
        rows: list[int] = []

        def add(w: torch.Tensor | QWeight) -> None:
            linears.append(w.parts() if isinstance(w, QWeight) else [w])
            rows.append(w.shape[0])

        extras: list[torch.Tensor] = []
        for layer in model.layers:
            norms += [layer["attn_norm"], layer["ffn_norm"]]
            for key in _LAYER_LINEARS:
                add(layer[key])
            extras += [layer.get(key, torch.empty(0)) for key in LAYER_EXTRAS]
        norms.append(model.out_norm)
        add(model.output)
        dims = [cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
                cfg.vocab_size]
        self._native = kernels().DecodeModel(dims, cfg.norm_eps, norms, linears, rows, extras,
                                             cfg.attn_scale, ACTIVATIONS[cfg.activation],
                                             list(cfg.windows))
        self._model = model
        self._decode = decode  # a key of DECODE_MODES
        self._rope = RopeTables(model.rope, local_rope(cfg, model.rope))

    @staticmethod
    def supports(model: DecoderModel, device: torch.device, dtype: torch.dtype,
                 kv_dtype: torch.dtype) -> str | None:
        """None when the fused step can run this model here, else why not."""
        if device.type != "cpu" or dtype != torch.float32:
            return "the fused decode step runs on the CPU in float32"
        if kv_dtype not in (torch.float32, torch.float16):
            return "the fused decode step keeps the KV cache in float32 or float16"
        return fused_refusal(model.cfg, model.rope)

    def step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[SeqStep],
             store: PagedKVStore, *, decode: str | None = None) -> torch.Tensor:
        """Logits [sequences wanting them, vocab] after one forward of `tokens` (every
        sequence's new tokens, in order: one for a generated token, a chunk for a prompt).
        `decode` overrides the kernel chosen at construction."""
        rows = row_arrays(positions, seqs, store.block_size)
        ids = torch.tensor(tokens, dtype=torch.long)
        x = self._model.ops.embedding(self._model.embed, ids)
        if self._model.cfg.embed_scale != 1.0:
            x = x * self._model.cfg.embed_scale
        x = x.contiguous()
        cos, sin, *local = self._rope(rows.positions)
        cos_local, sin_local = (torch.from_numpy(t) for t in local) if local else (
            torch.empty(0), torch.empty(0))
        generated, prompt = DECODE_MODES[decode or self._decode]
        out: Any = self._native.step(
            x, torch.from_numpy(cos), torch.from_numpy(sin), torch.from_numpy(rows.write_slots),
            torch.from_numpy(rows.block_tables), torch.from_numpy(rows.ctx_lens), store.k,
            store.v, store.block_size, torch.from_numpy(rows.logit_rows),
            ACTS[generated], ACTS[prompt], rows.generated_rows, cos_local, sin_local)
        return out
