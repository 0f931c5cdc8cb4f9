import subprocess
import sys


def test_importing_llama_engine_imports_no_torch_or_mlx() -> None:
    code = (
        "import sys, llama_engine\n"
        "from llama_engine import LlamaEngine, SamplingParams, TokenStream\n"
        "bad = sorted(m for m in ('torch', 'mlx', 'numpy') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
