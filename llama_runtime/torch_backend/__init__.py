"""The torch backend: CPU and CUDA."""

from llama_runtime.torch_backend.engine import TorchEngine

__all__ = ["TorchEngine"]
