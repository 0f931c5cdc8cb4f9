"""The kernels (csrc/), compiled at install by setup.py once per instruction-set level, loaded with
ctypes: the best build this CPU *and OS* run is picked at first use. No torch, no compiler and
nothing written at run time.

Which build runs is decided by the plain C++ build (it runs everywhere), whose le_cpu_features()
reads CPUID and XGETBV: a feature the CPU lists but the OS does not enable (AMX on these VMs) is
never used. LLAMA_ENGINE_ISA forces a slower build (tests, benchmarks).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["ACTIVATIONS", "ACTS", "CSRC", "DECODE_MODES", "ISAS", "KernelsUnavailable",
           "LeWeight", "StepArgs", "available_isas", "cpu_features", "isa", "library"]

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None

ACTS = {"int16": 2, "int8": 1, "exact": 0}
"""A product's activation arithmetic (csrc/qgemm.h's Acts): 16-bit integers per 32-block (two
int8 digits each), int8 per 32-block (llama.cpp's scheme), or float."""

DECODE_MODES = {"mixed": ("int16", "exact"), "int16": ("int16", "int16"),
                "int8": ("int8", "int8"), "exact": ("exact", "exact")}
"""The fused step's modes (the engines' `decode` option): the arithmetic (keys of ACTS) of the
tokens the model generates, then of prompt tokens. "mixed" computes a prompt's K/V in float,
so that the context every later token attends to is the float model's, and each generated
token with int16 activations (docs/performance.md)."""

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
"""The MLP gate's activation (csrc/decode.h's Activation)."""

ISAS = ("avx512-vnni", "avx2", "neon-dotprod", "generic")
"""The kernels' builds, fastest first (setup.py's BUILDS): AVX-512 VNNI, AVX2 + FMA (x86),
AArch64 with the dot-product extension, plain C++ (everywhere)."""

FEATURE_BITS = {"avx2": 0, "fma": 1, "f16c": 2, "avx512f": 3, "avx512bw": 4, "avx512vl": 5,
                "avx512_vnni": 6, "amx_tile": 7, "neon": 8, "dotprod": 9}
"""csrc/cpu.cpp's le_cpu_features() bits (names as /proc/cpuinfo spells them)."""

_NEEDS = {
    "avx512-vnni": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                              "avx512_vnni"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "neon-dotprod": frozenset({"neon", "dotprod"}),
    "generic": frozenset(),
}


class KernelsUnavailable(RuntimeError):
    """The package's compiled kernels are missing or cannot load (an install without them)."""


def _path(build: str) -> Path | None:
    """The installed library of `build` for this interpreter, or None."""
    stem = "_" + build.replace("-", "_")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:  # this Python's, most specific first
        path = HERE / (stem + suffix)
        if path.is_file():
            return path
    return None


@functools.cache
def sources_hash() -> str:
    """What the installed sources hash to (setup.py's sources_hash, which builds it in)."""
    digest = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def _open(build: str) -> ctypes.CDLL:
    path = _path(build)
    if path is None:
        raise KernelsUnavailable(
            f"the {build} build of the kernels is not installed in {HERE}; reinstall the "
            "package (pip install llama-engine, or pip install -e . in a checkout) so that "
            "setup.py compiles them")
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:  # a truncated or foreign file
        raise KernelsUnavailable(f"cannot load the kernels' {build} build {path}: {e}; "
                                 "reinstall the package") from e


@functools.cache
def cpu_features() -> frozenset[str]:
    """What this CPU has and the OS enables (FEATURE_BITS' names), asked of the plain build."""
    lib = _open("generic")
    lib.le_cpu_features.restype = ctypes.c_uint64
    bits = int(lib.le_cpu_features())
    return frozenset(name for name, bit in FEATURE_BITS.items() if bits >> bit & 1)


def available_isas() -> list[str]:
    """The installed builds this CPU and OS run, fastest first."""
    have = cpu_features()
    return [name for name in ISAS if _NEEDS[name] <= have and _path(name) is not None]


def isa() -> str:
    """The build that runs: the fastest available, or LLAMA_ENGINE_ISA's choice (one of ISAS; a
    build this machine cannot run raises). Every build gives the kernels' exact bits."""
    asked = os.environ.get("LLAMA_ENGINE_ISA", "").strip().lower()
    if asked:
        if asked not in _NEEDS:
            raise KernelsUnavailable(
                f"LLAMA_ENGINE_ISA={asked!r}: expected one of {', '.join(ISAS)}")
        if asked not in available_isas():
            lacking = sorted(_NEEDS[asked] - cpu_features())
            why = (f"this CPU or OS lacks {', '.join(lacking)}" if lacking else
                   "that build is not installed")
            raise KernelsUnavailable(f"LLAMA_ENGINE_ISA={asked!r}: {why}; unset it")
        return asked
    return available_isas()[0]


class LeWeight(ctypes.Structure):
    """csrc/capi.cpp's le_weight."""

    _fields_ = [("kind", ctypes.c_int32), ("f16", ctypes.c_int32), ("qs", ctypes.c_void_p),
                ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("per", ctypes.c_int64), ("qh", ctypes.c_void_p)]


class StepArgs(ctypes.Structure):
    """csrc/decode.h's StepArgs."""

    _fields_ = [("x", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("write_slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("ctx_lens", ctypes.c_void_p),
                ("B", ctypes.c_int64), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("half_kv", ctypes.c_bool),
                ("n_slots", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("logit_rows", ctypes.c_void_p), ("R", ctypes.c_int64),
                ("acts", ctypes.c_int32), ("prompt_acts", ctypes.c_int32),
                ("generated_rows", ctypes.c_int64), ("logits", ctypes.c_void_p),
                ("hidden", ctypes.c_void_p), ("cos_local", ctypes.c_void_p),
                ("sin_local", ctypes.c_void_p)]


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.le_error.restype = ctypes.c_char_p
    lib.le_set_threads.argtypes = [i32]
    lib.le_threads.restype = i32
    lib.le_isa.restype = ctypes.c_char_p
    lib.le_sources_hash.restype = ctypes.c_char_p
    lib.le_linear.argtypes = [ctypes.POINTER(LeWeight), p, i64, p, i32]
    lib.le_linear.restype = i32
    lib.le_gelu.argtypes = [p, i64, i32]
    lib.le_gelu.restype = i32
    lib.le_dequant.argtypes = [ctypes.POINTER(LeWeight), p]
    lib.le_dequant.restype = i32
    lib.le_model_new.argtypes = [ctypes.POINTER(i64), ctypes.c_float, ctypes.c_float, i32,
                                 ctypes.POINTER(i64), i64, ctypes.POINTER(ctypes.c_void_p), i64,
                                 ctypes.POINTER(LeWeight), i64,
                                 ctypes.POINTER(ctypes.c_void_p), i64]
    lib.le_model_new.restype = p
    lib.le_model_free.argtypes = [p]
    lib.le_model_step.argtypes = [p, ctypes.POINTER(StepArgs)]
    lib.le_model_step.restype = i32
    lib.le_model_set_profiling.argtypes = [p, i32]
    lib.le_model_profile.argtypes = [p, ctypes.c_char_p, i64]
    lib.le_model_profile.restype = i64
    lib.le_parallel_test.argtypes = [i64, i64, i64, i64, i64, p, ctypes.POINTER(i32)]
    lib.le_parallel_test.restype = i32
    lib.le_parallel_stress.argtypes = [i64, i32, i64, ctypes.POINTER(i64)]
    lib.le_parallel_stress.restype = i32


def library() -> Any:
    """The loaded kernels (ctypes releases the GIL around every call); raises KernelsUnavailable
    when they are not installed or LLAMA_ENGINE_ISA asks for a build this machine lacks."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = _open(isa())
                _declare(lib)
                built_from = lib.le_sources_hash().decode()
                if CSRC.is_dir() and built_from != sources_hash():
                    raise KernelsUnavailable(
                        f"the installed kernels ({_path(isa())}) were built from other sources "
                        f"than {CSRC} (a checkout edited since it was installed?); reinstall "
                        "the package (pip install -e . in a checkout) to rebuild them")
                _lib = lib
            except KernelsUnavailable as e:
                _error = str(e)
            except AttributeError as e:  # built from older sources than this package's
                _error = (f"the installed kernels lack a function ({e}); reinstall the "
                          "package (pip install -e . in a checkout) to rebuild them")
        if _lib is None:
            raise KernelsUnavailable(str(_error))
        return _lib
