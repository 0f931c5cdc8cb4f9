"""The kernels' thread pool (csrc/parallel.h) through its C check, le_parallel_test: every index
of a range runs exactly once whatever the range, grain and number of calling threads; nested
regions run serially; an exception in a chunk reaches the caller and leaves the pool usable.

The stress cases run in a child process with a time limit, so a lost wake-up or a deadlock
fails the test instead of hanging the suite."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llama_runtime.kernels.library import library


def _value(i: np.ndarray) -> np.ndarray:
    return np.fmod(i * 7919, 1000003)  # C++ remainder: negative for negative i


def _run(begin: int, end: int, grain: int, *, nested: int = 0,
         throw_at: int = 1 << 62) -> tuple[int, np.ndarray, int]:
    lib = library()
    out = np.zeros(max(end - begin, 0), np.int64)
    used = ctypes.c_int32(0)
    rc = lib.le_parallel_test(begin, end, grain, nested, throw_at, out.ctypes.data,
                              ctypes.byref(used))
    return rc, out, used.value


@pytest.mark.parametrize(("begin", "end", "grain"),
                         [(0, 1, 1), (0, 2, 1), (5, 6, 100), (0, 1000, 1), (3, 1003, 7),
                          (0, 100_000, 64), (-50, 50, 3), (0, 17, 17), (0, 18, 17)])
def test_every_index_runs_exactly_once(begin: int, end: int, grain: int) -> None:
    rc, out, used = _run(begin, end, grain)
    assert rc == 0
    np.testing.assert_array_equal(out, _value(np.arange(begin, end)))
    assert 1 <= used <= max(1, library().le_threads())


def test_an_empty_range_runs_nothing() -> None:
    rc, out, used = _run(10, 10, 1)
    assert rc == 0 and out.size == 0 and used == 0


def test_nested_regions_run_serially_on_the_chunks_thread() -> None:
    rc, out, _ = _run(0, 500, 1, nested=37)
    assert rc == 0
    np.testing.assert_array_equal(out, _value(np.arange(500)) + 37)


def test_an_exception_reaches_the_caller_and_the_pool_still_works() -> None:
    lib = library()
    rc, _, _ = _run(0, 10_000, 1, throw_at=4321)
    assert rc == -1
    assert b"failure at 4321" in lib.le_error()
    rc, out, _ = _run(0, 10_000, 1)
    assert rc == 0
    np.testing.assert_array_equal(out, _value(np.arange(10_000)))


STRESS = textwrap.dedent("""
    import ctypes, sys
    from llama_runtime.kernels.library import library

    lib = library()
    lib.le_set_threads(2)
    bad = ctypes.c_int64(-1)
    assert lib.le_parallel_stress(int(sys.argv[1]), 3, 4000, ctypes.byref(bad)) == 0
    print("bad regions", bad.value)
""")


@pytest.mark.parametrize("spin_us", ["0", "1", "100"])
def test_many_short_regions_from_several_threads_finish(spin_us: str) -> None:
    """Short regions back to back from three calling threads (the scheduler thread, a test's own,
    an embedding call), with the spin before sleeping off, tiny, and at its default: this is
    where a wake-up lost between regions hangs, or a worker claiming from a finished region runs
    a chunk that does not exist. (It once did: a late worker paired the old counter with the next
    region's range; this test with 1 µs of spin caught it in a few seconds.)"""
    proc = subprocess.run([sys.executable, "-c", STRESS, "300000"], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "LLAMA_ENGINE_SPIN_US": spin_us})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bad regions 0" in proc.stdout
