"""What the fuzz suites share: a call must end in a result or a `LlamaError` within SECONDS and
without raising the process's peak RSS by RSS_GROWTH, and the worst cases are measured again in
a fresh interpreter (a high-water mark says little in a long test run)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from llama_engine.errors import LlamaError

SECONDS = 5.0
MB = 1 << 20
RSS_GROWTH = 300 * MB
FUZZ = settings(
    max_examples=60,
    deadline=None,  # `bounded` checks the time of each call itself
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def peak_rss() -> int:
    """This process's peak resident set, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bounded(call: Callable[[], Any]) -> Any:
    """`call()`'s result or the `LlamaError` it raised; anything else fails the test, as does a
    call slower than SECONDS or one that raises the peak RSS by more than RSS_GROWTH."""
    rss, start = peak_rss(), time.perf_counter()
    try:
        result = call()
    except LlamaError as e:
        result = e
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak_rss() - rss < RSS_GROWTH, f"peak RSS grew by {(peak_rss() - rss) / MB:.0f} MB"
    return result


def check_named_case(case: Callable[[Path], Any], tmp_path: Path) -> None:
    """A WORST_CASES entry, run in this process: its call ends, bounded, in the error it names
    with a message matching its phrase."""
    call, error, phrase = case(tmp_path)
    result = bounded(call)
    assert isinstance(result, error), result
    assert re.search(phrase, str(result)), str(result)


def check_worst_cases_in_a_fresh_process(test_file: str, tmp_path: Path, preload: str) -> None:
    """Run every case of `test_file`'s WORST_CASES in a fresh interpreter whose address space is
    capped at 4 GiB (in case a bound is missing), after importing `preload` (imports are not the
    cases' growth): each must fail typed, within SECONDS, growing the peak RSS < RSS_GROWTH."""
    code = f"""
import importlib.util, json, resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
spec = importlib.util.spec_from_file_location("fuzz_cases", {test_file!r})
mod = sys.modules["fuzz_cases"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
import {preload}
from bounded_calls import peak_rss
out = {{}}
for name, case in mod.WORST_CASES.items():
    tmp = Path({str(tmp_path)!r}) / name
    tmp.mkdir()
    call, error, phrase = case(tmp)
    before, start = peak_rss(), time.perf_counter()
    try:
        call()
        kind = "opened"
    except Exception as e:
        kind = type(e).__name__
    out[name] = [kind, time.perf_counter() - start, peak_rss() - before]
print(json.dumps(out))
"""
    path = [str(Path(__file__).parent), *sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (kind, seconds, growth) in report.items():
        assert kind in ("ConfigError", "WeightLoadError"), (name, kind)
        assert seconds < SECONDS, (name, seconds)
        assert growth < RSS_GROWTH, (name, growth / MB)
