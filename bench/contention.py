"""Decode speed on a quiet machine and with busy processes on the same cores, ours and llama.cpp's,
in one run.

    python bench/contention.py [--model smollm2-135m-instruct] [--threads 2] [--busy 2]
                               [--gen-tokens 64] [--repeats 3] [--only llama_engine llama_cpp]

An app that embeds the engine does other work while it generates, and other processes share the
cores. Each engine runs in its own child process, one after another: it loads the model, decodes
--gen-tokens greedy tokens after a short prompt --repeats times on the quiet machine, then starts
--busy CPU-bound processes (a Python loop each, never yielding), decodes again, and stops them.
Prints one JSON object: per engine the median quiet and contended decode tok/s and their ratio
(contended / quiet: 1.0 means busy neighbours cost nothing), and ours over llama.cpp's in each
condition. Needs the `bench` extra for llama-cpp-python: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ENGINES = ("llama_engine", "llama_cpp")
BUSY_LOOP = "while True: pass"


def _decode_rates(decode_once: Callable[[], float], repeats: int, busy: int) -> list[float]:
    """decode_once() `repeats` times, with `busy` spinning processes running meanwhile."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        if procs:
            time.sleep(0.5)  # let them start spinning
        return [decode_once() for _ in range(repeats)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def ours(job: dict[str, Any]) -> Callable[[], float]:
    from llama_runtime import create_engine

    engine = create_engine(job["path"], threads=job["threads"], progress=False)
    prompt, gen = job["prompt"], job["gen"]
    engine.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)  # warm-up

    def decode_once() -> float:
        c = engine.generate(prompt, max_tokens=gen, temperature=0, ignore_eos=True)
        return float(c.usage.decode_tok_s)

    return decode_once


def llama_cpp(job: dict[str, Any]) -> Callable[[], float]:
    from llama_cpp import Llama

    prompt, gen = job["prompt"], job["gen"]
    llm = Llama(model_path=job["path"], n_ctx=len(prompt) + gen + 16, n_threads=job["threads"],
                n_threads_batch=job["threads"], verbose=False)
    llm.eval(prompt[:8])  # warm-up

    def decode_once() -> float:
        llm.reset()
        t_first = 0.0
        for made, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
            if made == 1:
                t_first = time.perf_counter()
            if made == gen:
                break
        return (gen - 1) / (time.perf_counter() - t_first)

    return decode_once


RUNNERS: dict[str, Callable[[dict[str, Any]], Callable[[], float]]] = {
    "llama_engine": ours, "llama_cpp": llama_cpp}


def _worker(name: str, job: dict[str, Any]) -> dict[str, Any]:
    decode_once = RUNNERS[name](job)
    decode_once()  # warm-up: the first run pays for first-touch page faults
    quiet = _decode_rates(decode_once, job["repeats"], 0)
    busy = _decode_rates(decode_once, job["repeats"], job["busy"])
    q, b = statistics.median(quiet), statistics.median(busy)
    return {"quiet_tok_s": round(q, 2), "contended_tok_s": round(b, 2),
            "contended_over_quiet": round(b / q, 3),
            "quiet_runs": [round(x, 2) for x in quiet],
            "contended_runs": [round(x, 2) for x in busy]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the engine")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        try:
            res = _worker(args.worker, json.loads(args.job))
        except Exception as e:  # reported, not raised: a missing peer must not hide ours
            res = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res))
        return

    from llama_models import open_model
    from llama_tokenizer import Tokenizer

    files = open_model(args.model)
    tok = Tokenizer.from_gguf_metadata(files.checkpoint.metadata)
    job = {"path": str(files.checkpoint.path), "threads": args.threads, "busy": args.busy,
           "gen": args.gen_tokens, "repeats": max(1, args.repeats),
           "prompt": tok.encode("Write a long story about a lighthouse keeper.")}
    results: dict[str, Any] = {}
    for name in args.only:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--job",
                               json.dumps(job)], capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        results[name] = (json.loads(lines[-1]) if lines else
                         {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"})
    out: dict[str, Any] = {"model": args.model, "threads": args.threads, "busy": args.busy,
                           "gen_tokens": args.gen_tokens, "engines": results}
    a, b = results.get("llama_engine", {}), results.get("llama_cpp", {})
    if "quiet_tok_s" in a and "quiet_tok_s" in b:
        out["ours_over_llama_cpp"] = {
            "quiet": round(a["quiet_tok_s"] / b["quiet_tok_s"], 3),
            "contended": round(a["contended_tok_s"] / b["contended_tok_s"], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
