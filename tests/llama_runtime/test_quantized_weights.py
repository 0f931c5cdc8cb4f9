"""Weights kept quantized: the compiled kernels against the dequantized reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_models import open_model
from llama_models.checkpoint import RawTensor
from llama_models.dequant import dequantize
from llama_runtime.torch_backend.qweights import KEPT_QUANTIZED, kernels, repack


@pytest.fixture(scope="module")
def weights() -> dict[str, RawTensor]:
    return open_model("smollm2-135m-instruct").weights


def _q4_0(n: int, k: int) -> RawTensor:
    import gguf

    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    return RawTensor("w", int(gguf.GGMLQuantizationType.Q4_0), (n, k), data)


def _reference(raw: RawTensor) -> torch.Tensor:
    return dequantize(torch.from_numpy(np.array(raw.data)), raw.qtype, raw.shape)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 40])
@pytest.mark.parametrize("name", ["blk.3.ffn_down.weight", "blk.0.attn_k.weight",
                                  "token_embd.weight", "q4_0"])
def test_kernel_equals_dequantized_matmul(weights, name: str, rows: int) -> None:
    raw = _q4_0(256, 576) if name == "q4_0" else weights[name]
    ref_w = _reference(raw)
    qw = repack(raw)
    assert torch.equal(qw.dequantize(), ref_w)  # repacking keeps the stored values exactly
    x = torch.randn(rows, raw.shape[1], generator=torch.Generator().manual_seed(rows))
    got, want = qw.linear(x), x @ ref_w.T
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_int8_activation_kernels_stay_within_their_quantization_error(weights) -> None:
    """The llama.cpp-style variants (int8 activations) are not exact; bound their error."""
    ext = kernels()
    raw = weights["blk.5.ffn_up.weight"]
    qw, ref_w = repack(raw), _reference(raw)
    x = torch.randn(6, raw.shape[1], generator=torch.Generator().manual_seed(1))
    want = x @ ref_w.T
    got = ext.q4_linear(x, qw.qs, qw.d, qw.m)
    assert float((got - want).norm() / want.norm()) < 0.02
    emb = repack(weights["token_embd.weight"])
    got8 = ext.q8_linear(x, emb.qs, emb.d)
    want8 = x @ _reference(weights["token_embd.weight"]).T
    assert float((got8 - want8).norm() / want8.norm()) < 0.02


def test_engine_reports_which_weights_stay_quantized(engine) -> None:
    paths = engine.weight_paths()
    assert paths["blk.0.ffn_gate.weight"] == KEPT_QUANTIZED
    assert paths["token_embd.weight"] == KEPT_QUANTIZED
    assert paths["blk.0.attn_norm.weight"] != KEPT_QUANTIZED


@pytest.mark.slow
def test_quantized_and_dequantized_engines_agree(engine) -> None:
    from llama_runtime import create_engine

    plain = create_engine(threads=2, progress=False, weights="dequant")
    assert all(p != KEPT_QUANTIZED for p in plain.weight_paths().values())
    for prompt in ("The tallest mountain on Earth is", "import numpy as np\n"):
        ids = engine.tokenize(prompt)
        a, b = engine.new_session(), plain.new_session()
        engine.prefill(a, ids)
        plain.prefill(b, ids)
        assert np.abs(engine.next_token_logits(a) - plain.next_token_logits(b)).max() < 1e-3
        engine.close_session(a)
        plain.close_session(b)
        assert (engine.generate(ids, max_tokens=24, temperature=0, ignore_eos=True).token_ids
                == plain.generate(ids, max_tokens=24, temperature=0, ignore_eos=True).token_ids)
