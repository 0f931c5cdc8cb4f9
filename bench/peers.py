"""Our engine against llama-cpp-python and transformers on the same GGUF, in one run.

    python bench/peers.py [--model smollm2-135m-instruct] [--threads 2] [--prompt-tokens 512]
                          [--gen-tokens 128] [--only NAME ...]
                          [--decode auto|mixed|int16|int8|exact|torch]
                          [--kv-dtype auto|float32|float16]
                          [--backend auto|native|torch|mlx]

--backend mlx compares our MLX backend against mlx-lm itself and against our native backend
instead: llama_engine (ours, backend="mlx"), mlx_lm (mlx-lm's llama model built from the same
GGUF by bench/mlx_peer.py, timed on its generate_step path) and llama_engine_native (ours,
backend="native"), with ratios vs_mlx_lm and vs_native (ours on MLX over each). MLX's CPU
backend is slow, so its defaults are --prompt-tokens 128 --gen-tokens 32 --repeats 1
--concurrency 1; llama_cpp and transformers run only when --only names them.

Also: TTFT of a prompt whose first blocks were served before (prefix-cache hit) against one
that was not, and aggregate generated tok/s with N requests at once for each --concurrency N
(ours batches them; llama-cpp-python serves them one after another, as it does).

Each engine runs in its own child process, one after another (so they never share the cores and
each peak RSS is its own), on the same prompt token ids, the same thread count, greedy decoding
of exactly --gen-tokens new tokens (end-of-sequence ignored). Prints one JSON object: every
engine's figures and our ratios to each peer (>1 is better for us on tok/s; <1 is better for us
on TTFT and RSS). decode_tok_s is the median of --repeats runs (this machine's run-to-run spread
is about 15%). peak_rss_mb is the peak after loading and serving the single request;
peak_rss_mb_all the peak at the end, after the concurrency runs (ours then holds N sessions' KV
at once, llama.cpp one). Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ENGINES = ("llama_engine", "llama_cpp", "transformers", "mlx_lm", "llama_engine_native")
DEFAULT_ENGINES = ("llama_engine", "llama_cpp", "transformers")
MLX_ENGINES = ("llama_engine", "mlx_lm", "llama_engine_native")
"""--backend mlx: ours on MLX, mlx-lm, ours on the native backend."""
DEFAULTS = {"prompt_tokens": 512, "gen_tokens": 128, "repeats": 3, "concurrency": [1, 4, 16]}
MLX_DEFAULTS = {"prompt_tokens": 128, "gen_tokens": 32, "repeats": 1, "concurrency": [1]}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_parts_mb() -> dict[str, float]:
    """The resident set now, anonymous memory and mapped files apart (Linux; else nothing):
    a mapped model file's pages count in RSS as the kernel keeps them resident."""
    try:
        with open("/proc/self/status") as f:
            st = dict(line.split(":", 1) for line in f)
    except OSError:
        return {}
    return {f"rss_{k[3:].lower()}_mb": int(st[k].split()[0]) / 1024
            for k in ("RssAnon", "RssFile") if k in st}


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    from llama_runtime import create_engine
    from llama_runtime.bench import generate_all

    prompt, gen = job["prompt"], job["gen"]
    t0 = time.perf_counter()
    # the MLX backend has one arithmetic (decode="auto" only): --decode is the native entry's
    decode = {} if job["backend"] == "mlx" else {"decode": job["decode"]}
    engine = create_engine(job["path"], threads=job["threads"], progress=False,
                           backend=job["backend"], kv_dtype=job["kv_dtype"], **decode)
    load_s = time.perf_counter() - t0
    engine.generate(prompt[:16], max_tokens=4, temperature=0, ignore_eos=True)  # warm-up
    c = engine.generate(prompt, max_tokens=gen, temperature=0, ignore_eos=True)
    u = c.usage
    decode = [u.decode_tok_s] + [  # repeats reuse the prompt's cached blocks: decode only
        engine.generate(prompt, max_tokens=gen, temperature=0, ignore_eos=True).usage.decode_tok_s
        for _ in range(job["repeats"] - 1)]
    from llama_runtime.kernels.library import library

    res: dict[str, Any] = {"backend": engine.model.backend,
                           "kernels": library().le_isa().decode(),  # the build it loaded
                           "decode": engine.decode_kernel,  # the arithmetic that ran
                           "kv_dtype": engine.stats()["kv_dtype"],
                           "load_s": load_s,
                           "prefill_tok_s": u.prefill_tok_s,
                           "ttft_ms": u.ttft_ms, "decode_tok_s": statistics.median(decode),
                           "decode_tok_s_runs": decode, "tokens": c.token_ids,
                           "peak_rss_mb": _rss_mb(), **_rss_parts_mb()}
    # prefix cache: a prompt sharing all but its last 32 tokens with one served before
    miss, hit = job["prefix_pair"]
    res["ttft_ms_prefix_miss"] = engine.generate(miss, max_tokens=1, temperature=0).usage.ttft_ms
    res["ttft_ms_prefix_hit"] = engine.generate(hit, max_tokens=1, temperature=0).usage.ttft_ms
    for n, prompts in job["concurrent"].items():
        t0 = time.perf_counter()
        done = generate_all(engine, prompts, max_tokens=gen, temperature=0, ignore_eos=True)
        made = sum(len(d.token_ids) for d in done)
        res[f"aggregate_tok_s_n{n}"] = made / (time.perf_counter() - t0)
    return res


def run_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    path, prompt, gen, threads = job["path"], job["prompt"], job["gen"], job["threads"]
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(prompt) + gen + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    llm.eval(prompt[:16])  # warm-up

    def one_request() -> tuple[list[int], float, float]:
        llm.reset()
        t0 = time.perf_counter()
        tokens: list[int] = []
        t_first = 0.0
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if not tokens:
                t_first = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) == gen:
                break
        return tokens, (t_first - t0) * 1e3, (gen - 1) / (time.perf_counter() - t_first)

    tokens, ttft_ms, first_decode = one_request()
    decode = [first_decode] + [one_request()[2] for _ in range(job["repeats"] - 1)]
    # prefill alone, from an empty cache
    llm.reset()
    p0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - p0
    res: dict[str, Any] = {"load_s": load_s, "prefill_tok_s": len(prompt) / prefill_s,
                           "ttft_ms": ttft_ms, "decode_tok_s": statistics.median(decode),
                           "decode_tok_s_runs": decode, "tokens": tokens,
                           "peak_rss_mb": _rss_mb(),
                           "kernels": " ".join(  # the CPU features its build uses
                               f.split("=")[0].split(":")[-1].strip() for f in
                               llama_cpp.llama_print_system_info().decode().split("|")
                               if f.strip().endswith("= 1"))}

    def first_token_ms(ids: list[int]) -> float:
        t = time.perf_counter()
        next(iter(llm.generate(ids, temp=0.0, top_k=1, reset=True)))
        return (time.perf_counter() - t) * 1e3

    miss, hit = job["prefix_pair"]
    llm.reset()
    res["ttft_ms_prefix_miss"] = first_token_ms(miss)
    res["ttft_ms_prefix_hit"] = first_token_ms(hit)  # llama.cpp reuses its last prompt's prefix
    for n, prompts in job["concurrent"].items():  # one after another: it serves one at a time
        t0 = time.perf_counter()
        made = 0
        for ids in prompts:
            llm.reset()
            for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                made += 1
                if made % gen == 0:
                    break
        res[f"aggregate_tok_s_n{n}"] = made / (time.perf_counter() - t0)
    return res


def run_transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    path, prompt, gen, threads = job["path"], job["prompt"], job["gen"], job["threads"]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model(ids[:, :16])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t_first = time.perf_counter()
        tokens = [tok]
        past = out.past_key_values
        while len(tokens) < gen:
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
        t_end = time.perf_counter()
    return {"load_s": load_s, "prefill_tok_s": len(prompt) / (t_first - t0),
            "ttft_ms": (t_first - t0) * 1e3, "decode_tok_s": (gen - 1) / (t_end - t_first),
            "tokens": tokens, "peak_rss_mb": _rss_mb()}


def run_ours_native(job: dict[str, Any]) -> dict[str, Any]:
    """Ours on the native backend (--decode, --kv-dtype as given), beside --backend mlx."""
    return run_ours({**job, "backend": "native"})


def run_mlx_lm(job: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mlx_peer import run_mlx_lm as run

    return run(job)


RUNNERS = {"llama_engine": run_ours, "llama_cpp": run_llama_cpp, "transformers": run_transformers,
           "mlx_lm": run_mlx_lm, "llama_engine_native": run_ours_native}


def _worker(args: argparse.Namespace) -> None:
    with open(args.job) as f:
        job = json.load(f)
    try:
        res = RUNNERS[args.worker](job)
        res["peak_rss_mb_all"] = _rss_mb()  # after the concurrency runs too
    except Exception as e:  # reported, not raised: one missing peer must not hide the others
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res))


def _ratio(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float] | None:
    if "error" in ours or "error" in peer:
        return None
    keys = ["prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "peak_rss_mb_all"]
    keys += sorted(k for k in ours if k.startswith(("aggregate_", "ttft_ms_prefix")) and k in peer)
    return {k: round(ours[k] / peer[k], 3) for k in keys if k in ours and k in peer}


def _agreeing(a: list[int] | None, b: list[int] | None) -> int | None:
    if a is None or b is None:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


_VS = {"llama_engine_native": "vs_native"}
"""A ratio's name where it is not vs_<engine>."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, help="default 512 (--backend mlx: 128)")
    ap.add_argument("--gen-tokens", type=int, help="default 128 (--backend mlx: 32)")
    ap.add_argument("--concurrency", type=int, nargs="*",
                    help="aggregate tok/s with N requests at once (llama.cpp: one after another);"
                         " default 1 4 16 (--backend mlx: 1)")
    ap.add_argument("--only", nargs="*", choices=ENGINES,
                    help=f"default {' '.join(DEFAULT_ENGINES)} "
                         f"(--backend mlx: {' '.join(MLX_ENGINES)})")
    ap.add_argument("--repeats", type=int,
                    help="single-request decode runs per engine (the median is reported); "
                         "default 3 (--backend mlx: 1)")
    ap.add_argument("--decode", default="auto",
                    choices=["auto", "mixed", "int16", "int8", "exact", "torch"],
                    help="our arithmetic (create_engine's decode option)")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16"],
                    help="our KV cache's dtype (create_engine's kv_dtype option)")
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "torch", "mlx"],
                    help="our backend (auto: native on a CPU for a GGUF model; mlx: against "
                         "mlx-lm and our native backend)")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    mlx = args.backend == "mlx"
    for key, value in (MLX_DEFAULTS if mlx else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.only is None:
        args.only = list(MLX_ENGINES if mlx else DEFAULT_ENGINES)

    from llama_models import open_model
    from llama_runtime.bench import make_prompt
    from llama_tokenizer import Tokenizer

    files = open_model(args.model)
    path = str(files.checkpoint.path)
    tok = Tokenizer.from_gguf_metadata(files.checkpoint.metadata)

    class _Tok:  # make_prompt only needs tokenize()
        def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
            return tok.encode(text, add_special=add_special)

    t = _Tok()
    prompt = make_prompt(t, args.prompt_tokens)  # type: ignore[arg-type]
    miss = make_prompt(t, args.prompt_tokens, variant=1000)  # type: ignore[arg-type]
    hit = miss[:-32] + make_prompt(t, 32, variant=1001)  # type: ignore[arg-type]
    job = {"path": path, "prompt": prompt, "gen": args.gen_tokens, "threads": args.threads,
           "decode": args.decode, "kv_dtype": args.kv_dtype, "backend": args.backend,
           "repeats": max(1, args.repeats),
           "prefix_pair": [miss, hit],
           "concurrent": {n: [make_prompt(t, args.prompt_tokens, variant=100 * n + i)  # type: ignore[arg-type]
                              for i in range(n)] for n in args.concurrency}}
    results: dict[str, Any] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        for name in args.only:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--job", f.name],
                capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            results[name] = (json.loads(lines[-1]) if lines else
                             {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"})
    finally:
        os.unlink(f.name)
    tokens = {k: v.pop("tokens", None) for k, v in results.items()}
    ours = results.get("llama_engine", {"error": "not run"})
    out: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "engines": {k: {m: round(x, 2) if isinstance(x, float) else x for m, x in v.items()}
                    for k, v in results.items()},
        "ratios": {_VS.get(k, f"vs_{k}"): _ratio(ours, v)
                   for k, v in results.items() if k != "llama_engine"},
        # int8 kernels (llama.cpp's, ours with --decode int8) drift from the float reference
        # after a near-tie, so this counts the leading greedy tokens each peer shares with us
        "greedy_tokens_agreeing_with_ours": {
            k: _agreeing(tokens[k], tokens.get("llama_engine"))
            for k in tokens if k != "llama_engine"},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
