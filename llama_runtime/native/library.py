"""The kernels (csrc/) built as a plain shared library and loaded with ctypes: no torch.

The torch backend builds the same sources into a torch extension (torch_backend/qweights.py);
this build adds csrc/capi.cpp, a C interface, and links nothing but the C++ runtime and OpenMP.
It is compiled on first use with the system's C++ compiler into
~/.cache/llama_engine/native/<hash of the sources and flags>/ (LLAMA_ENGINE_CACHE overrides the
root), so a changed source is rebuilt and concurrent processes never see a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["ACTIVATIONS", "ACTS", "CSRC", "DECODE_MODES", "ISAS", "LeWeight", "StepArgs",
           "available_isas", "compile_flags", "isa", "library"]

CSRC = Path(__file__).parent.parent / "csrc"
_SOURCES = ("qgemm.cpp", "decode.cpp", "capi.cpp")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


# what a compiler's -march=native defines, as /proc/cpuinfo's flag names
_MACROS = {"__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__AVX512F__": "avx512f",
           "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
           "__AVX512VNNI__": "avx512_vnni"}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: /proc/cpuinfo's (Linux), else the features the compiler's
    -march=native turns on (macOS on x86, say), else none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    compiler = _compiler()
    if compiler is None:
        return frozenset()
    try:
        done = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    defined = {line.split()[1] for line in done.stdout.splitlines()
               if line.startswith("#define ")}
    return frozenset(flag for macro, flag in _MACROS.items() if macro in defined)


@functools.cache
def _compiler_accepts(flags: tuple[str, ...]) -> bool:
    """Whether the compiler knows these -m flags (an old GCC lacks -mavx512vnni)."""
    compiler = _compiler()
    if compiler is None or not flags:
        return True
    try:
        done = subprocess.run([compiler, *flags, "-E", "-x", "c++", os.devnull],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


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

ISAS = ("avx512-vnni", "avx2", "generic")
"""The kernels' builds, fastest first (csrc/qgemm.cpp): AVX-512 VNNI, AVX2 + FMA, plain C++."""

_ISA_FLAGS = {
    "avx512-vnni": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                               "avx512_vnni"}),
                    ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                     "-mavx512vnni"]),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-mavx2", "-mfma", "-mf16c"]),
    "generic": (frozenset(), []),
}


def available_isas() -> list[str]:
    """The builds this CPU runs and the compiler can make, fastest first."""
    cpu = _cpu_flags()
    return [name for name in ISAS
            if _ISA_FLAGS[name][0] <= cpu and _compiler_accepts(tuple(_ISA_FLAGS[name][1]))]


def isa() -> str:
    """The build this CPU runs: the fastest it supports, or LLAMA_ENGINE_ISA's choice (one of
    ISAS; a build the CPU or the compiler lacks raises). Every build gives the kernels' exact
    bits."""
    asked = os.environ.get("LLAMA_ENGINE_ISA", "").strip().lower()
    if asked:
        if asked not in _ISA_FLAGS:
            raise RuntimeError(f"LLAMA_ENGINE_ISA={asked!r}: expected one of {', '.join(ISAS)}")
        if asked not in available_isas():
            lacking = sorted(_ISA_FLAGS[asked][0] - _cpu_flags())
            why = (f"this CPU lacks {', '.join(lacking)}" if lacking else
                   "the C++ compiler does not accept its flags")
            raise RuntimeError(f"LLAMA_ENGINE_ISA={asked!r}: {why}; unset it")
        return asked
    return available_isas()[0]


def compile_flags() -> list[str]:
    """Flags for csrc/ on this CPU (see isa()): OpenMP on (only for its thread count and to
    see an OpenMP region around a call: parallel_for runs on its own pool), and
    hidden symbols, so the torch extension and this library, both built from csrc/, never
    share one (GCC would otherwise make inline functions' statics process-wide "unique"
    symbols)."""
    return ["-O3", "-fopenmp", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
            *_ISA_FLAGS[isa()][1]]


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


def _cache_root() -> Path:
    root = os.environ.get("LLAMA_ENGINE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "llama_engine"


def _build() -> Path:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    flags = [*compile_flags(), "-std=c++17", "-shared", "-fPIC"]
    digest = hashlib.sha256(" ".join([compiler, *flags]).encode())
    for f in sorted(CSRC.glob("*")):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.name.encode() + f.read_bytes())
    out_dir = _cache_root() / "native" / digest.hexdigest()[:16]
    lib = out_dir / "libllama_engine_native.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        cmd = [compiler, *flags, "-o", str(tmp_lib), *(str(CSRC / s) for s in _SOURCES)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_lib, lib)  # atomic: another process sees the whole file or none
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.le_error.restype = ctypes.c_char_p
    lib.le_set_threads.argtypes = [i32]
    lib.le_threads.restype = i32
    lib.le_isa.restype = ctypes.c_char_p
    lib.le_linear.argtypes = [ctypes.POINTER(LeWeight), p, i64, p, i32]
    lib.le_linear.restype = i32
    lib.le_model_new.argtypes = [ctypes.POINTER(i64), ctypes.c_float, ctypes.c_float, i32,
                                 ctypes.POINTER(i64), i64, ctypes.POINTER(ctypes.c_void_p), i64,
                                 ctypes.POINTER(LeWeight), i64,
                                 ctypes.POINTER(ctypes.c_void_p), i64]
    lib.le_model_new.restype = p
    lib.le_model_free.argtypes = [p]
    lib.le_model_step.argtypes = [p, ctypes.POINTER(StepArgs)]
    lib.le_model_step.restype = i32
    lib.le_model_set_profiling.argtypes = [p, i32]
    lib.le_parallel_test.argtypes = [i64, i64, i64, i64, i64, p, ctypes.POINTER(i32)]
    lib.le_parallel_test.restype = i32
    lib.le_parallel_stress.argtypes = [i64, i32, i64, ctypes.POINTER(i64)]
    lib.le_parallel_stress.restype = i32


def library() -> Any:
    """The loaded library (ctypes releases the GIL around every call), building it on first
    use; raises RuntimeError when it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = ctypes.CDLL(str(_build()))
                _declare(lib)
                _lib = lib
            except (RuntimeError, OSError) as e:
                _error = str(e)
        if _lib is None:
            raise RuntimeError(f"the native kernels could not be built ({_error})")
        return _lib
