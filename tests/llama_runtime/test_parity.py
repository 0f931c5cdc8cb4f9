"""Our torch engine against transformers loading the same GGUF (dequantized, float32)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
    "1, 2, 3, 5, 8, 13,",
    "Les mathématiques sont",
]
N_NEW = 32


@pytest.fixture(scope="module")
def hf_model(smollm2_path: str):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
        dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_match_transformers(exact_engine, hf_model, hf_greedy,
                                                      prompt: str) -> None:
    engine = exact_engine
    ids = engine.tokenize(prompt)
    session = engine.new_session()
    try:
        engine.prefill(session, ids)
        ours_logits = engine.next_token_logits(session)
    finally:
        engine.close_session(session)
    with torch.inference_mode():
        ref_logits = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        ref = hf_greedy(hf_model, ids, N_NEW)
    assert np.abs(ours_logits - ref_logits).max() < 1e-3
    ours = engine.generate(ids, max_tokens=N_NEW, temperature=0, ignore_eos=True).token_ids
    assert ours == ref
