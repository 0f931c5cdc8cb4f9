"""Our OpenAI-compatible server against llama.cpp's llama-server under load, in one run.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--threads 2] [--clients 16]
                               [--requests 2] [--timeout 600] [--rounds prompt decode]
                               [--llama-server PATH] [--only ours|llama_server]
                               [--decode auto|mixed|int16|int8|exact]

N streaming clients (asyncio + httpx, the same client code for both servers) each send
--requests requests one after another to /v1/completions on 127.0.0.1, with a raw prompt (no
chat template, so both servers compute the same tokens) and greedy decoding of exactly the
round's new tokens (end of sequence ignored). Rounds: "prompt" (~500-token prompts, 128 new
tokens) and "decode" (~50-token prompts, 256 new tokens). Every prompt starts with its own
request number, so no request finds another's prompt in a prefix cache.

The servers run one after the other, each alone on the machine, as child processes on the same
GGUF file with the same thread count: ours is `llama-engine serve`, the peer is llama-server
(built for this CPU by ../shared/tools/llama-cpp-peers.sh; default
~/.cache/llama-cpp-peers/bin/llama-server) with -np N slots and a context of N x 1024 tokens,
which is continuous batching over parallel slots, what Ollama runs underneath. Each is warmed
with one request first.

Prints one JSON object: per round and server, aggregate generated tok/s (completion tokens over
the round's wall time), p50 / p99 time to first token (ms, from sending the request to its first
streamed token) and the requests that failed; and our ratios (aggregate: ours over theirs, >1 is
better for us; TTFT: ours over theirs, <1 is better for us). The issue's goal at 16 clients:
aggregate >= 3x, p99 TTFT <= 0.5x, in both rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROUNDS = {"prompt": {"prompt_tokens": 500, "gen_tokens": 128},
          "decode": {"prompt_tokens": 50, "gen_tokens": 256}}
PEER = Path.home() / ".cache/llama-cpp-peers/bin/llama-server"
FILLER = ("The history of the city is long and full of turns: markets grew along the river, "
          "bridges were built and rebuilt, and every century left a layer of stone. ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompt(i: int, tokens: int) -> str:
    """About `tokens` tokens of text (~1.15 tokens a word of this filler with SmolLM2's
    tokenizer), unique from its first words."""
    words = FILLER.split()
    body = " ".join(words[j % len(words)] for j in range(max(1, int(tokens / 1.15) - 4)))
    return f"Request {i}. {body}"


class _Server:
    """A server child process, its base URL, and how to stop it."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"{self.name} exited: {err}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_ours(model: str, threads: int, port: int, decode: str) -> _Server:
    cmd = [sys.executable, "-m", "llama_runtime.cli", "serve", "--model", model, "--threads",
           str(threads), "--port", str(port), "--log-level", "warning", "--decode", decode]
    return _Server("llama_engine", cmd, port, dict(os.environ))


def start_peer(binary: Path, gguf: str, threads: int, clients: int, port: int) -> _Server:
    cmd = [str(binary), "-m", gguf, "-t", str(threads), "-tb", str(threads), "-np",
           str(clients), "-c", str(clients * 1024), "--port", str(port), "--host", "127.0.0.1",
           "-cb", "--log-disable"]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:"
           f"{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return _Server("llama_server", cmd, port, env)


async def _one(http: httpx.AsyncClient, url: str, model: str, prompt: str, gen: int
               ) -> tuple[float, int]:
    """One streamed completion: (seconds to its first token, tokens generated)."""
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if any(c.get("text") for c in data.get("choices") or ()):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else chunks
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def _load(url: str, model: str, clients: int, requests: int, prompt_tokens: int,
                gen: int, timeout: float) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens = 0
    errors: list[str] = []  # why each failed request failed
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await _one(http, url, model, _prompt(10_000, prompt_tokens), 8)  # warm up

        async def client(c: int) -> None:
            nonlocal tokens
            for k in range(requests):
                try:
                    first, n = await _one(http, url, model,
                                          _prompt(c * requests + k, prompt_tokens), gen)
                except (httpx.HTTPError, ValueError) as e:
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                ttfts.append(first)
                tokens += n

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(clients))), timeout)
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {"aggregate_tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * statistics.median(ttfts), 1) if ttfts else None,
            "ttft_p99_ms": round(1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1)
            if ttfts else None,
            "requests": len(ttfts), "failed": len(errors), "tokens": tokens,
            "wall_s": round(wall, 2), **({"errors": errors[:3]} if errors else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, in turn")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a round may take")
    ap.add_argument("--rounds", nargs="*", default=list(ROUNDS), choices=list(ROUNDS))
    ap.add_argument("--llama-server", type=Path, default=PEER)
    ap.add_argument("--only", choices=["ours", "llama_server"], default=None)
    ap.add_argument("--decode", default="auto",
                    help="our server's arithmetic (auto: the default, float prompts; int16 "
                         "quantizes prompts too, ~1.5x faster prompts)")
    args = ap.parse_args()

    from llama_models import resolve_model_path

    gguf = str(resolve_model_path(args.model))
    servers = [s for s in ("ours", "llama_server") if args.only in (None, s)]
    if "llama_server" in servers and not args.llama_server.exists():
        sys.exit(f"llama-server not found at {args.llama_server}: build it with "
                 "../shared/tools/llama-cpp-peers.sh, or pass --only ours")
    out: dict[str, Any] = {"model": args.model, "gguf": os.path.basename(gguf),
                           "threads": args.threads, "decode": args.decode, "clients": args.clients,
                           "requests_per_client": args.requests, "rounds": {}}
    results: dict[str, dict[str, Any]] = {r: {} for r in args.rounds}
    for name in servers:
        port = _free_port()
        server = (start_ours(args.model, args.threads, port, args.decode) if name == "ours" else
                  start_peer(args.llama_server, gguf, args.threads, args.clients, port))
        try:
            server.wait_ready()
            for rnd in args.rounds:
                shape = ROUNDS[rnd]
                results[rnd][server.name] = asyncio.run(_load(
                    server.url, args.model, args.clients, args.requests,
                    shape["prompt_tokens"], shape["gen_tokens"], args.timeout))
        finally:
            server.stop()
    for rnd, by_server in results.items():
        entry: dict[str, Any] = {**ROUNDS[rnd], **by_server}
        ours, peer = by_server.get("llama_engine"), by_server.get("llama_server")
        if ours and peer and peer["aggregate_tok_s"] and peer["ttft_p99_ms"]:
            entry["aggregate_vs_llama_server"] = round(
                ours["aggregate_tok_s"] / peer["aggregate_tok_s"], 2)
            entry["ttft_p50_vs_llama_server"] = round(
                ours["ttft_p50_ms"] / peer["ttft_p50_ms"], 2)
            entry["ttft_p99_vs_llama_server"] = round(
                ours["ttft_p99_ms"] / peer["ttft_p99_ms"], 2)
        out["rounds"][rnd] = entry
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
