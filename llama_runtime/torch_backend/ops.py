"""`TorchOps`: the layer ops of llama_models.Ops on torch tensors (CPU or CUDA, same code)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llama_models.ops import RopeSpec
from llama_runtime.torch_backend.paged import StepBatch
from llama_runtime.torch_backend.qweights import QWeight

__all__ = ["TorchOps"]


class TorchOps:
    """Plain torch implementations. Weights are dense tensors of the compute dtype, or
    `QWeight`s multiplied by the compiled quantized kernels."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._inv_freq: dict[int, torch.Tensor] = {}  # by id() of the model's RopeSpec

    def embedding(self, table: torch.Tensor | QWeight, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(table, QWeight):
            return table.dequantize(ids).to(self.dtype)
        return F.embedding(ids, table)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QWeight) -> torch.Tensor:
        if isinstance(weight, QWeight):
            return weight.linear(x).to(self.dtype)
        return F.linear(x, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def rotary(self, positions: torch.Tensor, spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq.get(id(spec))
        if inv is None:
            inv = torch.tensor(spec.inv_freq(), dtype=torch.float32, device=self.device)
            self._inv_freq[id(spec)] = inv
        angles = positions.to(torch.float32)[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [N, 1, rotary_dim]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def rope(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = rot
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  batch: StepBatch, layer: int, scale: float) -> torch.Tensor:
        return batch.attend(q, k, v, layer, scale)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def take_rows(self, x: torch.Tensor, batch: Any) -> torch.Tensor:
        return x[batch.logits_rows]
