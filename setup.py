"""Builds the kernels (llama_runtime/kernels/csrc) at install, once per instruction-set level:
`pip install .`, `pip install -e .` and `python -m build` all compile them, and the library picks
the best build this CPU and OS run when it loads (llama_runtime/kernels/library.py). Nothing is
compiled after install.

Each build is a plain shared library with a C interface (csrc/capi.cpp), loaded with ctypes: it
is built as a setuptools Extension only so that it ships inside the package and the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "llama_runtime/kernels/csrc"
SOURCES = [f"{CSRC}/{name}.cpp" for name in ("qgemm", "decode", "capi", "cpu")]
# hidden symbols: only the C API (LE_API) is exported, so two builds loaded in one process never
# share an inline function's statics
COMMON = ["-std=c++17", "-O3", "-g0", "-fno-wrapv", "-fopenmp", "-fvisibility=hidden",
          "-fvisibility-inlines-hidden", "-Wno-unused-function"]


def _sources_hash() -> str:
    """What the kernels are built from: kernels/library.py's sources_hash (the same function
    refuses, at run time, a build from other sources), loaded from its file alone (stdlib
    only) since the package's dependencies may not be installed while it builds."""
    path = Path(__file__).parent / "llama_runtime" / "kernels" / "library.py"
    spec = importlib.util.spec_from_file_location("_llama_engine_kernels_library", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.sources_hash())


COMMON.append(f'-DLE_SOURCES_HASH="{_sources_hash()}"')

_MACHINE = platform.machine().lower()
BUILDS: dict[str, list[str]] = {"generic": []}
"""Build name (kernels/library.py's ISAS) -> its -m flags."""
if _MACHINE in ("aarch64", "arm64"):  # NEON is baseline; dotprod (ARMv8.2+) where the CPU has it
    BUILDS = {"neon_dotprod": ["-march=armv8.2-a+dotprod"], "generic": []}
if _MACHINE in ("x86_64", "amd64", "i686", "x86"):
    BUILDS = {
        "avx512_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                        "-mavx512vnni"],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "generic": [],
    }
if os.environ.get("LLAMA_ENGINE_BUILDS"):  # a developer's quicker build: a comma-separated subset
    BUILDS = {k: v for k, v in BUILDS.items()
              if k in os.environ["LLAMA_ENGINE_BUILDS"].split(",") or k == "generic"}


class BuildKernels(build_ext):
    """Each build in its own temporary folder: they compile the same sources with other flags,
    and setuptools names an object file after its source alone."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.parallel = None  # build_extension below swaps build_temp: one build at a time

    def build_extension(self, ext: Extension) -> None:
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a plain library: no PyInit_ function


setup(
    ext_modules=[
        Extension(f"llama_runtime.kernels._{name}", sources=SOURCES, language="c++",
                  depends=[f"{CSRC}/{h}" for h in ("qgemm.h", "decode.h", "parallel.h")],
                  extra_compile_args=[*COMMON, *flags], extra_link_args=["-fopenmp"])
        for name, flags in BUILDS.items()
    ],
    cmdclass={"build_ext": BuildKernels},
)
