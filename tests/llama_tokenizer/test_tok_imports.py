"""The tokenizer package stays light: no torch, no transformers."""

from __future__ import annotations

import subprocess
import sys


def test_importing_llama_tokenizer_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "from llama_tokenizer import ChatTemplate, StreamDecoder, Tokenizer\n"
        "import llama_tokenizer.gguf_vocab, llama_tokenizer.hf, llama_tokenizer.spm\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'mlx') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
