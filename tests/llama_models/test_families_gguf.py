"""Each family's GGUF files, as llama.cpp's converter writes them, against transformers.

A tiny random model per family and shape is made by transformers (with SmolLM2's vocabulary),
converted by llama.cpp's convert_hf_to_gguf.py (tests/families.py), and loaded by the engine:
the last prompt position's logits agree with transformers' float32 forward within 1e-4, and
20 greedy tokens are equal. The prompt (78 tokens) is longer than every sliding window here.
The native backend serves them all (the fused step runs every family's layer), and so does the
MLX backend; with weights quantized (Q8_0) the native kernels agree with
the op-by-op torch path on the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from families import (
    assert_last_logits_match,
    assert_same_greedy_tokens,
    make_hf_model,
    rewrite_gguf,
    to_gguf,
)

from llama_models import open_model, resolve_model_path
from llama_models.decoder import fused_refusal
from llama_runtime import create_engine
from llama_runtime.bench import prompt_logits
from llama_runtime.reference import ReferenceModel

IDS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1123, 5612, 28, 253, 1345, 29, 17] * 5


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# six layers in llama.cpp's pattern (the sixth global), windows of 16 positions; GGUF keeps no
# query_pre_attn_scalar (llama.cpp takes head_dim, as every released Gemma 3 but 27B has)
GEMMA3_WINDOWED = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                   "num_hidden_layers": 6,
                   "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3", {"head_dim": 32, "num_key_value_heads": 4}),  # no GQA, head width != dim / heads
    ("gemma3_text", GEMMA3_WINDOWED),
    ("phi3", {}),  # fused qkv and gate_up in the file, split at load
    # LongRoPE (factors as tensors, the attention factor as a key), past the original context
    ("phi3", {"original_max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 12.0, 20.0, 32.0]}}),
]


@pytest.mark.parametrize(("model_type", "extra"), CASES)
def test_gguf_logits_and_greedy_tokens_match_transformers(
        tmp_path: Path, smollm2_tokenizer: Any, hf_greedy: Any, model_type: str,
        extra: dict[str, Any]) -> None:
    ref = make_hf_model(tmp_path / "hf", model_type, smollm2_tokenizer, **extra)
    if model_type == "phi3":  # the converter reads Phi-3's vocabulary as BPE for this class only
        cfg_file = tmp_path / "hf" / "tokenizer_config.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text())
                                       | {"tokenizer_class": "GPT2Tokenizer"}))
    gguf = to_gguf(tmp_path / "hf", tmp_path / f"{model_type}.gguf")
    files = open_model(str(gguf))
    assert files.checkpoint.architecture == model_type.removesuffix("_text")
    engine = create_engine(str(gguf), progress=False)
    assert fused_refusal(files.config, files.rope) is None
    assert engine.backend == "native"  # the fused step runs every family's layer
    assert_last_logits_match(engine, ref, IDS)
    got = engine.generate(IDS, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    want = hf_greedy(ref, IDS, 20)
    assert_same_greedy_tokens(got, want, ref, IDS)
    ctx = engine.model.context_length
    engine.close()
    # the parity gate's reference (float32 op by op in numpy) is transformers' forward too
    with torch.inference_mode():
        theirs = ref(torch.tensor([IDS])).logits[0, -1].numpy()
    reference = ReferenceModel(files, context=ctx).greedy([IDS], 2)
    assert np.abs(reference.first[0] - theirs).max() < 1e-4
    assert reference.tokens[0].tolist() == want[:2]
    mlx = create_engine(str(gguf), progress=False, backend="mlx", prefill_chunk=32)
    try:  # the same model definition over MLX's ops, its paged K/V chunked across windows
        assert_last_logits_match(mlx, ref, IDS)
        got = mlx.generate(IDS, max_tokens=20, temperature=0, ignore_eos=True).token_ids
        assert_same_greedy_tokens(got, want, ref, IDS)
    finally:
        mlx.close()


@pytest.mark.parametrize(("model_type", "extra"), [("qwen2", {}), ("qwen3", {}),
                                                   ("gemma3_text", GEMMA3_WINDOWED)])
def test_native_kernels_run_the_variant_layers_as_the_torch_path(
        tmp_path: Path, smollm2_tokenizer: Any, model_type: str, extra: dict[str, Any]) -> None:
    """Q/K/V biases (Qwen2), Q/K norms (Qwen3), and Gemma 3's layer (norms after attention and
    MLP, tanh-GELU, scaled embeddings, its query scale, windows of 16 positions with their own
    RoPE base) on Q8_0 weights: the fused step's exact kernels against the op-by-op torch path
    over the same file, and a prompt chunked mid-window changes no bit."""
    make_hf_model(tmp_path / "hf", model_type, smollm2_tokenizer, **extra)
    gguf = to_gguf(tmp_path / "hf", tmp_path / f"{model_type}.gguf", outtype="q8_0")
    native = create_engine(str(gguf), progress=False, decode="exact")
    chunked = create_engine(str(gguf), progress=False, decode="exact", prefill_chunk=7)
    torch_path = create_engine(str(gguf), progress=False, backend="torch", decode="torch")
    assert native.backend == "native"
    logits = [prompt_logits(e, IDS) for e in (native, chunked, torch_path)]
    assert (logits[0] == logits[1]).all()
    assert abs(logits[0] - logits[2]).max() < 1e-3
    tokens = [e.generate(IDS, max_tokens=16, temperature=0, ignore_eos=True).token_ids
              for e in (native, torch_path)]
    assert tokens[0] == tokens[1]


def test_every_kept_type_stays_quantized_and_the_others_load(
        tmp_path: Path, smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A Llama GGUF whose linears take, in turn, every type a real file mixes (Q4_0 to Q6_K) and
    some no kernel keeps (Q2_K, IQ4_NL): the kept ones stay quantized on the native backend, the
    others are dequantized with a log line, and its exact step agrees with the op-by-op torch
    path (which dequantizes everything) on the same file."""
    import gguf as gg

    from llama_runtime.kernels.layout import KEPT_QUANTIZED, REPACKABLE

    Q = gg.GGMLQuantizationType
    types = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.IQ4_NL]
    make_hf_model(tmp_path / "hf", "llama", smollm2_tokenizer, hidden_size=256,
                  intermediate_size=512)
    f32 = to_gguf(tmp_path / "hf", tmp_path / "f32.gguf")
    assigned: dict[str, Any] = {}

    def qtype_of(name: str, shape: tuple[int, ...]) -> Any:
        if len(shape) != 2 or name == "token_embd.weight":
            return None
        assigned[name] = types[len(assigned) % len(types)]
        return assigned[name]

    mixed = rewrite_gguf(f32, tmp_path / "mixed.gguf", qtype_of)
    assert set(assigned.values()) == set(types)
    with caplog.at_level("WARNING", logger="llama_runtime.native.model"):
        native = create_engine(str(mixed), progress=False, decode="exact")
    assert native.backend == "native"
    paths = native.weight_paths()
    for name, qtype in assigned.items():
        assert (paths[name] == KEPT_QUANTIZED) == (int(qtype) in REPACKABLE), (name, qtype)
    assert "IQ4_NL, Q2_K weights are dequantized" in caplog.text
    torch_path = create_engine(str(mixed), progress=False, backend="torch", decode="torch")
    logits = [prompt_logits(e, IDS) for e in (native, torch_path)]
    assert abs(logits[0] - logits[1]).max() < 1e-4 * abs(logits[1]).max()
    tokens = [e.generate(IDS, max_tokens=16, temperature=0, ignore_eos=True).token_ids
              for e in (native, torch_path)]
    assert tokens[0] == tokens[1]
    native.close()
    torch_path.close()


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_a_model_windowed_on_every_layer_holds_o_window_blocks(
        tmp_path: Path, smollm2_tokenizer: Any, hf_greedy: Any, fmt: str) -> None:
    """Mistral with a 24-position window on every layer and KV blocks of 8 positions (its GGUF
    on the native backend, its HF directory on torch's): as a session grows, the blocks wholly
    out of its next token's window are given back, so a 200-token context holds at most 5
    blocks (25 without), its tokens are transformers', a save mid-way loads and continues
    exactly, and given-back blocks stay in the prefix cache."""
    ref = make_hf_model(tmp_path / "hf", "mistral", smollm2_tokenizer, sliding_window=24)
    path = tmp_path / "hf"
    if fmt == "gguf":  # llama.cpp's converter leaves Mistral's window out: the key it reads
        path = rewrite_gguf(to_gguf(path, tmp_path / "m.gguf"), tmp_path / "windowed.gguf",
                            uint32_keys={"llama.attention.sliding_window": 24})
    backend = "native" if fmt == "gguf" else "torch"  # (the native backend reads HF too)
    engine = create_engine(str(path), progress=False, kv_block_size=8, backend=backend)
    assert engine.backend == backend
    ids = IDS[:39]
    s = engine.new_session()
    peak, got = 0, []
    for chunk in engine.stream(ids, session=s, max_tokens=160, temperature=0, ignore_eos=True):
        got += [chunk.token_id] if chunk.token_id is not None else []
        peak = max(peak, engine.stats()["kv_blocks_used"])
    assert len(got) == 160
    assert_same_greedy_tokens(got, hf_greedy(ref, ids, 160), ref, ids)
    # ceil(24 / 8) blocks of window, the block being written, and one partly out of the window
    assert peak <= 5, peak
    assert engine.stats()["kv_blocks_cached"] >= 16  # given back full blocks stay matchable

    engine.save_session(s, tmp_path / "s.npz")
    context = [*ids, *got]
    more = engine.generate(context, session=s, max_tokens=24, temperature=0, ignore_eos=True)
    restored = engine.load_session(tmp_path / "s.npz")
    again = engine.generate(context, session=restored, max_tokens=24, temperature=0,
                            ignore_eos=True)
    assert again.token_ids == more.token_ids
    assert engine.stats()["kv_blocks_used"] <= 10  # both sessions: their windows only

    # the same prompt again, in a fresh session: its first blocks come from the prefix cache
    hit = engine.generate(ids, max_tokens=1, temperature=0, ignore_eos=True)
    assert hit.usage.cached_tokens == 32 and hit.token_ids == got[:1]
    engine.close()
