"""A decoder model (the layers the fused step runs) on the torch-free kernels: weights repacked
with numpy, the fused step (csrc/decode.cpp) called through ctypes, K/V in numpy arrays. Nothing
here imports torch, so a process that serves a model this way carries no torch runtime
(whose import alone is ~220 MB of RSS)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_models import ModelFiles, RawTensor
from llama_models.checkpoint import FLOAT_NAMES, dense_float32, release_pages
from llama_models.decoder import fused_refusal
from llama_runtime.kernels.api import dense_weight, le_weight
from llama_runtime.kernels.fused import FusedModel
from llama_runtime.kernels.layout import KEPT_QUANTIZED, REPACKABLE, PackedWeight, pack
from llama_runtime.kernels.library import (
    LeWeight,
    library,
)
from llama_runtime.kv_store import HostKVStore
from llama_runtime.step import SeqStep

__all__ = ["NativeModel", "unsupported"]

log = logging.getLogger(__name__)




def unsupported(files: ModelFiles) -> str | None:
    """None when this model runs here, else why not."""
    refusal = fused_refusal(files.config, files.rope)
    if refusal is not None:
        return refusal
    try:
        library()
    except RuntimeError as e:
        return str(e)
    return None


class NativeModel:
    """The model's weights in the kernels' layout and one native model over them."""

    def __init__(self, files: ModelFiles, *, decode: str, progress: Any = None) -> None:
        cfg = files.config
        self.cfg, self.decode = cfg, decode  # a key of DECODE_MODES
        self._keep: list[Any] = []  # every array the library borrows
        self.weight_paths: dict[str, str] = {}
        widened: set[int] = set()  # quantized types no kernel keeps quantized
        w = files.weights

        def weight(name: str) -> LeWeight:
            raw = w[name]
            if raw.qtype in REPACKABLE and len(raw.shape) == 2:
                p: PackedWeight = pack(raw)
                release_pages(raw.data)
                self._keep.append(p)
                self.weight_paths[name] = KEPT_QUANTIZED
                return le_weight(p)
            if raw.qtype not in FLOAT_NAMES:
                widened.add(raw.qtype)
            dense = dense_float32(raw)
            release_pages(raw.data)
            self._keep.append(dense)
            self.weight_paths[name] = "dequantized to float32"
            return dense_weight(dense)

        def norm(name: str) -> np.ndarray:
            """A small float32 tensor (FusedModel checks its size; the library copies it)."""
            self.weight_paths[name] = "float32"
            return dense_float32(w[name])

        def layer_weight(i: int | None, key: str) -> LeWeight:
            if i is None:  # the output projection: tied to the embeddings where it is absent
                return weight("output.weight" if "output.weight" in w else "token_embd.weight")
            if progress is not None:
                progress()
            return weight(f"blk.{i}.{key}.weight")

        def extra(i: int, key: str) -> np.ndarray | None:
            return norm(f"blk.{i}.{key}") if f"blk.{i}.{key}" in w else None

        self.fused = FusedModel.from_layers(
            cfg, files.rope, keep=self._keep, weight=layer_weight, extra=extra,
            norm=lambda i, key: norm(f"{key}.weight" if i is None else f"blk.{i}.{key}.weight"))
        if widened:
            import gguf

            names = ", ".join(sorted(gguf.GGMLQuantizationType(t).name for t in widened))
            log.warning("%s weights are dequantized to float32 at load: no kernel keeps them "
                        "quantized (docs/models.md lists the kept types)", names)
        # token embeddings are looked up row by row from the file (gguf's dequantizer)
        self._embed = w["token_embd.weight"]

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), dim]: the token embeddings (times the model's embedding scale)."""
        raw = self._embed
        picked = np.asarray(raw.data)[np.asarray(tokens, dtype=np.int64)]
        rows = dense_float32(RawTensor(raw.name, raw.qtype, (len(tokens), self.cfg.dim), picked))
        scale = self.cfg.embed_scale
        return rows * np.float32(scale) if scale != 1.0 else rows

    def step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[SeqStep],
             store: HostKVStore, *, decode: str | None = None,
             hidden: bool = False) -> np.ndarray:
        """Logits [sequences wanting them, vocab] after one forward of `tokens` (every
        sequence's new tokens, in order); `decode` overrides the model's mode (a key of
        DECODE_MODES).
        With `hidden`: the final-normed hidden states [len(tokens), dim] of every row instead."""
        return self.fused.run(self.embed(tokens), positions, seqs, store.k, store.v,
                              decode=decode or self.decode, hidden=hidden)
