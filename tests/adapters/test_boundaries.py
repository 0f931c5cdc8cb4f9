"""Dependencies point one way: the core never imports a framework, and the adapters use only
the `LlamaEngine` interface (plus `llama_runtime.create_engine` to build one)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("langchain", "langchain_core", "langgraph", "llama_index")


@pytest.mark.slow
def test_the_core_install_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import adapters, llama_engine, llama_runtime\n"
        "from llama_runtime import create_engine\n"
        "engine = create_engine(threads=1, progress=False, kv_memory='64MiB')\n"
        "engine.generate('Hi', max_tokens=2)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print('LOADED', ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, cwd=ROOT)
    assert "LOADED \n" in out.stdout, out.stdout


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}:{a.name}" for a in node.names}
    return found


def test_adapters_use_only_the_engine_interface() -> None:
    ours = ("llama_engine", "llama_runtime", "llama_models", "llama_kv", "llama_sampling",
            "llama_tokenizer", "torch", "numpy", "mlx")
    sources = sorted((ROOT / "adapters").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    assert len(sources) >= 7
    for path in sources:
        for name in _imports(path):
            module = name.split(":")[0]
            if module.split(".")[0] not in ours:
                continue
            allowed = module == "llama_engine" or name == "llama_runtime:create_engine"
            assert allowed, f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize(("module", "blocked", "extra"), [
    ("adapters.langchain", "langchain_core", "langchain"),
    ("adapters.langgraph", "langchain_core", "langgraph"),
    ("adapters.llama_index", "llama_index", "llama-index"),
])
def test_an_adapter_without_its_framework_names_the_extra(
    module: str, blocked: str, extra: str
) -> None:
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # as if it were not installed
            f"import {module}\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert f"pip install 'llama-engine[{extra}]'" in out.stderr, out.stderr
    assert _imports(ROOT / "adapters" / "__init__.py") == set()  # `import adapters` is free
