"""The kernels' builds (kernels/library.py; setup.py compiles them at install): AVX-512 VNNI,
AVX2 + FMA and plain C++ compute one product each way (int16, int8 and float activations). Every
kernel keeps an output row per vector
lane and does the same arithmetic in the same order in every build (the quantized ones' block
sums are exact integers; the float one is one FMA chain per output), so every build must give
the same bits. Each other build this CPU runs is
loaded in a subprocess (LLAMA_ENGINE_ISA) and compared with this process's."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_runtime.kernels.library import ISAS, available_isas, cpu_features, isa

ROWS = (1, 2, 5, 9, 40)

# Writes {kind}_{rows}_{int16|int8|exact} products to the npz path argv[1], for the row counts
# argv[2:]:
# a q4 weight from the model (Q4_1, float16 scales), synthetic Q4_0, Q8_0, Q5_1 and Q5_K ones with
# a row count that leaves the last 16-row group padded, and Gemma's Q4_K, Q5_0 and Q6_K ones: q4,
# q5, q8, q8 with a scale a 16 elements, float16 and float32 scales.
_PRODUCTS = """
import sys
import numpy as np
from llama_models import open_model, resolve_model_path
from llama_models.checkpoint import read_gguf
from llama_runtime.kernels.layout import pack
from llama_runtime.kernels.api import linear
from quant_blocks import T, quantized

gemma = read_gguf(resolve_model_path("gemma3-270m"))

def gemma_tensor(qtype):
    return next(t for t in gemma.tensors.values() if t.qtype == qtype and len(t.shape) == 2)

weights = {
    "q4_1": open_model("smollm2-135m-instruct").weights["blk.2.ffn_up.weight"],
    "q4_0": quantized(T.Q4_0, 250, 576, seed=2),
    "q4_0_20": quantized(T.Q4_0, 20, 64, seed=2),  # a group's second half padding
    "q8_0": quantized(T.Q8_0, 250, 1536, seed=8),
    "q5_1": quantized(T.Q5_1, 250, 576, seed=7),
    "q5_k": quantized(T.Q5_K, 40, 512, seed=13),
    "q4_k": gemma_tensor(T.Q4_K),
    "q5_0": gemma_tensor(T.Q5_0),
    "q6_k": gemma_tensor(T.Q6_K),
}
out = {}
for kind, raw in [*weights.items(), ("dense", None)]:
    if raw is None:  # a weight kept in float32 (a type not kept quantized)
        p = np.random.default_rng(7).standard_normal((37, 96)).astype(np.float32)
    else:
        p = pack(raw)
    k = p.shape[1]
    for rows in map(int, sys.argv[2:]):
        x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero activation block (scale 0)
        for acts in ("int16", "int8", "exact"):
            out[f"{kind}_{rows}_{acts}"] = linear(p, x, acts=acts)
    # blocks at the edges: all zero but one subnormal, tiny (1/scale overflows), with a NaN,
    # with an infinity
    x = np.random.default_rng(3).standard_normal((4, k)).astype(np.float32)
    x[0, :32] = 0.0
    x[0, 5] = 1e-44
    x[1, :32] *= 1e-38
    x[2, 7] = np.nan
    x[3, 9] = np.inf
    for acts in ("int16", "int8"):
        out[f"{kind}_edge_{acts}"] = linear(p, x, acts=acts)
np.savez(sys.argv[1], **out)
"""


def _products(tmp_path: Path, build: str | None) -> dict[str, np.ndarray]:
    path = tmp_path / f"{build or 'default'}.npz"
    env = dict(os.environ)
    env.pop("LLAMA_ENGINE_ISA", None)
    # the script imports the tests' quant_blocks
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]),
                                         *filter(None, [env.get("PYTHONPATH")])])
    if build:
        env["LLAMA_ENGINE_ISA"] = build
    done = subprocess.run([sys.executable, "-c", _PRODUCTS, str(path), *map(str, ROWS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(path) as f:
        return dict(f)


@pytest.fixture(scope="module")
def this_build(tmp_path_factory) -> dict[str, np.ndarray]:
    return _products(tmp_path_factory.mktemp("products"), None)


@pytest.mark.parametrize("build", [b for b in available_isas() if b != isa()])
def test_every_build_gives_the_same_bits(this_build, tmp_path, build: str) -> None:
    other = _products(tmp_path, build)
    assert other.keys() == this_build.keys()
    for key, want in this_build.items():
        assert np.array_equal(other[key], want, equal_nan=True), key


def test_an_unknown_or_unsupported_build_is_refused() -> None:
    env = dict(os.environ, LLAMA_ENGINE_ISA="avx9000")
    done = subprocess.run([sys.executable, "-c",
                           "from llama_runtime.kernels.library import library; library()"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "LLAMA_ENGINE_ISA='avx9000'" in done.stderr
    assert "avx512-vnni, avx2, neon-dotprod, generic" in done.stderr


@pytest.mark.parametrize(("acts", "bound"), [("int8", 0.02), ("int16", 1e-4)])
def test_a_quantized_product_is_within_its_quantization_error(this_build, acts: str,
                                                              bound: float) -> None:
    """Every build's quantized product stays near the float one: ~0.5% relative error per
    product with int8 activations (as llama.cpp's scheme gives), ~0.002% with int16."""
    checked = 0
    for key, got in this_build.items():
        if key.endswith(f"_{acts}") and "edge" not in key:
            want = this_build[key.removesuffix(acts) + "exact"]
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound, key
            checked += 1
    assert checked > 0


def test_every_build_is_installed_and_the_best_one_runs() -> None:
    """setup.py compiled every build at install; the one loaded is the fastest this machine
    runs, and a slower one is what the CPU lacks a feature for."""
    from llama_runtime.kernels.library import library

    assert available_isas()[-1] == "generic"
    assert isa() == available_isas()[0] or os.environ.get("LLAMA_ENGINE_ISA")
    assert library().le_isa().decode() == isa()
    if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
        assert ISAS[0] == "avx512-vnni"
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
        # what the library finds the OS enables is at most what the CPU lists
        assert cpu_features() <= flags | {"amx_tile"}
        assert "amx_tile" not in cpu_features() or "amx_tile" in flags
        wants = {"avx512_vnni", "avx512f", "avx512bw", "avx512vl"}
        assert ("avx512-vnni" in available_isas()) == (wants <= cpu_features())


def test_a_build_from_other_sources_is_refused() -> None:
    """The library carries the hash of the sources it was built from; one that differs from
    the installed sources (a checkout edited since its install) is refused with the way out."""
    from llama_runtime.kernels.library import library, sources_hash

    assert library().le_sources_hash().decode() == sources_hash()
    code = ("import llama_runtime.kernels.library as l\n"
            "l.sources_hash = lambda: 'edited'\n"
            "l.library()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "other sources" in done.stderr and "reinstall" in done.stderr
