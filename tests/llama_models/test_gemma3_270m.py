"""The packaged gemma3-270m (GGUF Q4_K_M) runs by name and answers as transformers does in
float32 on the same dequantized GGUF: the logits of a prompt's last position within 1e-4, and
greedy tokens equal on eight prompts (it is a base model: plain text, several languages, code,
arithmetic)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from families import assert_last_logits_match, assert_same_greedy_tokens

from llama_models import resolve_model_path
from llama_runtime import create_engine
from llama_runtime.bench import prompt_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Question: What is 17 + 25?\nAnswer:",
    "La capitale de l'Italie est",
    "Die Hauptstadt von Deutschland ist",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "import numpy as np\nx = np.arange(10)\nprint(",
]
STEPS = 24


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("gemma3-270m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine() -> Any:
    e = create_engine("gemma3-270m", progress=False)
    yield e
    e.close()


def test_last_logits_match_transformers(engine: Any, reference: Any) -> None:
    ours = assert_last_logits_match(engine, reference, engine.tokenize(PROMPTS[0]))
    assert engine.detokenize([int(ours.argmax())]).strip()  # a real word, not padding


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(engine: Any, reference: Any, hf_greedy: Any,
                                          prompt: str) -> None:
    ids = engine.tokenize(prompt)
    got = engine.generate(ids, max_tokens=STEPS, temperature=0, ignore_eos=True).token_ids
    assert_same_greedy_tokens(got, hf_greedy(reference, ids, STEPS), reference, ids)


def test_prompt_chunking_changes_no_bit(engine: Any) -> None:
    """One KV head of 256 dimensions: a step of one row splits attention's reads over chunks of
    positions and slices of dimensions (decode.cpp's attend_split), a step of a whole chunk
    over tiles of rows; both give the same bits, on the windowed layers too (600 positions,
    past the 512-position window)."""
    import numpy as np

    ids = engine.tokenize(" ".join(PROMPTS * 8))[:600]
    assert len(ids) == 600
    one_row = create_engine("gemma3-270m", progress=False, prefill_chunk=1)
    assert np.array_equal(prompt_logits(engine, ids), prompt_logits(one_row, ids))
    one_row.close()
