"""`llama-engine` as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("llama-engine")
    cmd = [exe] if exe else [sys.executable, "-m", "llama_runtime.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_run_answers_paris_and_reports_speed() -> None:
    r = _cli("run", "Name the capital of France.", "--temperature", "0", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "prefill" in r.stderr and "decode" in r.stderr


def test_info_describes_the_default_model() -> None:
    r = _cli("info", "smollm2-135m-instruct", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["context_length"] == 8192
    assert info["chat_template"] is True and info["quant_types"]["Q4_1"] == 210
    assert 130e6 < info["parameters"] < 140e6


def test_info_backends_and_models() -> None:
    backends = json.loads(_cli("info", "--backends", "--json").stdout)
    assert {b["name"] for b in backends} >= {"native", "torch", "mlx"}
    table = _cli("info", "--backends").stdout.splitlines()  # a table, one row a backend
    assert table[0].split()[:3] == ["backend", "available", "devices"]
    rows = {line.split()[0]: line.split() for line in table[1:] if not line.startswith(" ")}
    assert rows.keys() == {b["name"] for b in backends}
    mlx = "yes" if importlib.util.find_spec("mlx") is not None else "no"
    assert rows["native"][1] == "yes" and rows["mlx"][1] == mlx
    models = json.loads(_cli("info", "--models", "--json").stdout)
    assert "smollm2-135m-instruct" in models and "install" in models["gemma3-270m"]


@pytest.mark.slow
def test_bench_json_has_the_contract_fields() -> None:
    r = _cli("bench", "--json", "--prompt-tokens", "64", "--gen-tokens", "8", "--threads", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("backend", "device", "dtype", "prefill_tok_s", "decode_tok_s", "ttft_ms",
                "aggregate_tok_s", "concurrency", "peak_rss_mb"):
        assert key in out, key
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
