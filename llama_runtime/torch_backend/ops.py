"""`TorchOps`: the layer ops of llama_models.Ops on torch tensors (CPU or CUDA, same code)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llama_models.checkpoint import BF16, F16, RawTensor, float32
from llama_models.ops import RopeSpec
from llama_runtime.torch_backend.paged import StepBatch
from llama_runtime.torch_backend.qweights import QWeight

__all__ = ["TorchOps", "float_tensor"]


def float_tensor(raw: RawTensor) -> torch.Tensor:
    """A float tensor of a checkpoint (F32, F16 or BF16) in its own dtype, copied out of the
    file's mapping."""
    data = np.asarray(raw.data)
    if raw.qtype == BF16:  # its bit patterns (numpy has no bfloat16)
        bits = torch.from_numpy(np.array(data.view(np.uint16), copy=True))
        return bits.view(torch.bfloat16).reshape(raw.shape)
    values = data.view(np.float16) if raw.qtype == F16 else float32(raw)
    return torch.from_numpy(np.array(values, copy=True)).reshape(raw.shape)


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
        cos, sin = angles.cos(), angles.sin()
        if spec.attention_factor != 1.0:
            cos, sin = cos * spec.attention_factor, sin * spec.attention_factor
        return cos.to(self.dtype), sin.to(self.dtype)

    def rope(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = rot
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  batch: StepBatch, layer: int, scale: float, *, window: int = 0) -> torch.Tensor:
        return batch.attend(q, k, v, layer, scale, window=window)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def take_rows(self, x: torch.Tensor, batch: Any) -> torch.Tensor:
        return x[batch.logits_rows]

    # -- encoders (BERT family) -----------------------------------------------------------------
    def linear_bias(self, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def gelu(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        return F.gelu(x, approximate="tanh" if approximate else "none")

    def key_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        # [B, 1, 1, T]: every query row of a sequence sees the same keys; None = no padding
        return None if bool(mask.all()) else mask[:, None, None, :]

    def encoder_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        b, t, h, d = q.shape
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=key_mask, scale=scale)
        return out.transpose(1, 2).reshape(b, t, h * d)

    def pool(self, x: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
        """Pooled in float32 (as sentence-transformers accumulates half-precision inputs)."""
        x = x.float()
        keep = mask[..., None].to(x.dtype)  # [B, T, 1]
        lengths = keep.sum(1).clamp(min=1.0)  # [B, 1]
        out: list[torch.Tensor] = []
        for mode in modes:
            if mode == "cls":
                out.append(x[:, 0])
            elif mode == "max":
                out.append(x.masked_fill(~mask[..., None], float("-inf")).amax(1))
            elif mode == "mean":
                out.append((x * keep).sum(1) / lengths)
            elif mode == "mean_sqrt_len_tokens":
                out.append((x * keep).sum(1) / lengths.sqrt())
            elif mode == "weightedmean":
                w = keep * torch.arange(1, x.shape[1] + 1, device=x.device,
                                        dtype=x.dtype)[None, :, None]
                out.append((x * w).sum(1) / w.sum(1).clamp(min=1e-9))
            elif mode == "lasttoken":
                last = mask.sum(1).clamp(min=1) - 1
                out.append(x[torch.arange(x.shape[0], device=x.device), last])
            else:
                raise ValueError(f"unknown pooling mode {mode!r}")
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    def l2_normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=-1)
