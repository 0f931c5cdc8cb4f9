"""Weights kept quantized: the compiled kernels against the dequantized reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_blocks import T, quantized

from llama_models import open_model
from llama_models.checkpoint import RawTensor
from llama_models.dequant import dequantize
from llama_runtime.kernels.api import dequant, linear
from llama_runtime.kernels.layout import REPACKABLE, pack
from llama_runtime.torch_backend.qweights import KEPT_QUANTIZED, repack, weight_path


@pytest.fixture(scope="module")
def weights() -> dict[str, RawTensor]:
    return open_model("smollm2-135m-instruct").weights


def _q4_0(n: int, k: int) -> RawTensor:
    return quantized(T.Q4_0, n, k)


def _reference(raw: RawTensor) -> torch.Tensor:
    return dequantize(torch.from_numpy(np.array(raw.data)), raw.qtype, raw.shape)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 40])
@pytest.mark.parametrize("name", ["blk.3.ffn_down.weight", "blk.0.attn_k.weight",
                                  "token_embd.weight", "q4_0"])
def test_kernel_equals_dequantized_matmul(weights, name: str, rows: int) -> None:
    # 250 rows: not a multiple of the kernels' 16-row groups, so the last group is padded
    raw = _q4_0(250, 576) if name == "q4_0" else weights[name]
    ref_w = _reference(raw)
    qw = repack(raw)
    assert torch.equal(qw.dequantize(), ref_w)  # repacking keeps the stored values exactly
    x = torch.randn(rows, raw.shape[1], generator=torch.Generator().manual_seed(rows))
    got, want = qw.linear(x), x @ ref_w.T
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("acts", "bound"), [("int8", 0.02), ("int16", 1e-4)])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("name", ["blk.5.ffn_up.weight", "token_embd.weight", "q4_0"])
def test_quantized_activation_kernels_stay_within_their_quantization_error(
        weights, name: str, rows: int, acts: str, bound: float) -> None:
    """The kernels that quantize activations per 32-block are not exact: each product stays
    within 2% relative error with int8 (about 0.5% is typical: llama.cpp's scheme), and 0.01%
    with int16 (about 0.002%)."""
    raw = _q4_0(250, 576) if name == "q4_0" else weights[name]
    qw, ref_w = repack(raw), _reference(raw)
    x = torch.randn(rows, raw.shape[1], generator=torch.Generator().manual_seed(rows))
    want = x @ ref_w.T
    got = qw.linear(x, acts=acts)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < bound


def test_engine_reports_which_weights_stay_quantized(engine) -> None:
    paths = engine.weight_paths()
    assert paths["blk.0.ffn_gate.weight"] == KEPT_QUANTIZED
    assert paths["token_embd.weight"] == KEPT_QUANTIZED
    assert paths["blk.0.attn_norm.weight"] != KEPT_QUANTIZED


@pytest.mark.slow
def test_quantized_and_dequantized_engines_agree(exact_engine) -> None:
    """Quantized weights with the exact fused decode step against dequantized float weights
    run op by op in torch (the reference path)."""
    from llama_runtime import create_engine

    engine = exact_engine
    plain = create_engine(threads=2, progress=False, weights="dequant", decode="torch")
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


@pytest.mark.parametrize("acts", ["exact", "int8", "int16"])
def test_a_rows_result_does_not_depend_on_the_other_rows(weights, acts: str) -> None:
    """Batch invariance: the many-row (panel, tiled) and few-row paths give bit-identical rows,
    so batching sessions or chunking a prompt never changes a sequence's numbers."""
    qw = repack(weights["blk.2.ffn_gate.weight"])
    x = torch.randn(40, qw.shape[1], generator=torch.Generator().manual_seed(3))
    together = qw.linear(x, acts=acts)
    for i in (0, 7, 39):
        assert torch.equal(together[i:i + 1], qw.linear(x[i:i + 1], acts=acts))
    assert torch.equal(together[:9], qw.linear(x[:9], acts=acts))


KEPT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def test_the_kept_types_are_the_repackable_ones() -> None:
    assert {int(t) for t in KEPT_TYPES} == set(REPACKABLE)
    from llama_runtime.kernels.layout import KEPT_TYPES as NAMES  # what `info` lists

    assert {t.name for t in KEPT_TYPES} == set(NAMES)


@pytest.mark.parametrize("qtype", KEPT_TYPES, ids=lambda t: t.name)
def test_every_kept_type_repacks_exactly_and_multiplies(qtype: T) -> None:
    """Each type the kernels keep quantized holds gguf's dequantized values exactly (read back
    whole, by rows, and by the kernels' own dequantizer), and its product agrees with the float
    one through both callers (torch tensors and numpy arrays: the same bits) at every tile size.
    250 rows leave the last 16-row group padded; 512 columns are two K-quant super-blocks."""
    raw = quantized(qtype, 250, 512, seed=int(qtype))
    ref_w = _reference(raw)
    qw = repack(raw)
    assert torch.equal(qw.dequantize(), ref_w)
    rows = torch.tensor([0, 15, 16, 249])
    assert torch.equal(qw.dequantize(rows), ref_w[rows])
    packed = pack(raw)
    assert torch.equal(torch.from_numpy(dequant(packed)), ref_w)
    for n in (1, 2, 5, 9, 17):
        x = torch.randn(n, 512, generator=torch.Generator().manual_seed(n))
        want = x.double() @ ref_w.double().T
        for acts, bound in (("exact", 1e-6), ("int16", 1e-4), ("int8", 0.02)):
            got = qw.linear(x, acts=acts)
            assert torch.equal(got, torch.from_numpy(linear(packed, x.numpy(), acts=acts)))
            assert float((got.double() - want).norm() / want.norm()) < bound, acts


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_gemma3_tensors_repack_to_the_same_values_and_multiply(qtype: T) -> None:
    """The packaged Gemma 3 Q4_K_M GGUF's types keep their values exactly: Q4_K in the q4
    layout (per-32 scale d * sc and offset -dmin * m), Q5_0 in the q5 layout (nibbles and
    fifth bits, scale d and offset -16d), Q6_K in the q8 layout with a scale d * sc a 16
    elements."""
    from llama_models import resolve_model_path
    from llama_models.checkpoint import read_gguf

    ckpt = read_gguf(resolve_model_path("gemma3-270m"))
    tensors = [t for t in ckpt.tensors.values() if t.qtype == qtype and len(t.shape) == 2][:2]
    assert tensors, f"the Gemma 3 GGUF should hold tensors of type {qtype}"
    for raw in tensors:
        assert weight_path(raw, quantized=True) == KEPT_QUANTIZED
        qw, ref_w = repack(raw), _reference(raw)
        assert torch.equal(qw.dequantize(), ref_w)
        x = torch.randn(5, raw.shape[1], generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(qw.linear(x), x @ ref_w.T, rtol=1e-5, atol=1e-4)


def test_repacking_in_slices_and_wide_q4_0_offsets_keep_the_values(monkeypatch) -> None:
    """pack() works a slice of rows at a time (here 16, so 40 rows take three, the last one
    short), and a Q4_0 block whose offset -8d overflows float16 sends the scales to float32."""
    from llama_runtime.kernels import layout

    monkeypatch.setattr(layout, "PACK_ROWS", 16)
    raw = _q4_0(40, 64)
    data = np.array(raw.data).reshape(40, 2, 18)
    data[3, 1, 0:2] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # -8d: inf in f16
    raw = RawTensor("w", raw.qtype, raw.shape, data.reshape(40, -1))
    packed = layout.pack(raw)
    assert packed.d.dtype == np.float32
    assert torch.equal(repack(raw).dequantize(), _reference(raw))
