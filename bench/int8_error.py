"""How far each decode mode moves greedy tokens and logits from the float model.

    python bench/int8_error.py [--model smollm2-135m-instruct] [--tokens 64] [--threads 2]
                               [--reference live|cached] [--write-reference]
                               [--logit-steps 8] [--modes mixed int16 int8 exact]
                               [--modes torch-bfloat16 torch-float32]

1. Greedy agreement, what decides a user's answer. The prompts of REFERENCE (chat-templated and
   raw; several languages, code, arithmetic) each get --tokens greedy tokens (end of sequence
   ignored) from our engine in each mode, compared with the float reference: transformers in
   float32 on the dequantized GGUF, run here (--reference live) or read from REFERENCE
   (--reference cached). Per mode: whole continuations equal to the reference's, first tokens
   equal, and each divergent prompt with its first divergent step (0: the first token) and the
   reference's margin there (its top logit minus the runner-up: how near a tie that choice
   was). --write-reference stores the live reference's prompt ids, tokens and margins in
   REFERENCE, which tests/llama_runtime/test_parity.py holds the default engine to.
2. Logit error: 12 contexts (a prompt, then --logit-steps greedy tokens of the default engine),
   the last position's logits in each quantized mode and from llama.cpp (llama-cpp-python on the
   same GGUF; its CPU kernels quantize activations to int8) against decode="exact" (the GGUF's
   own values in float arithmetic, up to summation order): ||x - ref|| / ||ref|| and
   max |x - ref|. tests/llama_runtime/test_fused_decode.py's tolerances rest on these. ("mixed"
   is left out: a context computed as a prompt is exact's arithmetic there, and a generated
   token int16's.)

A mode named torch-DTYPE runs the torch backend on the CPU with every weight dequantized to DTYPE
(what the CUDA path computes, bfloat16 by default there, up to its kernels' summation order).

Prints one JSON object. llama.cpp needs the `bench` extra (skipped with a note when missing),
--reference live needs transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from llama_runtime.bench import prompt_logits

REFERENCE = Path(__file__).parent.parent / "tests" / "llama_runtime" / "data" / \
    "float_reference.json"

CONTEXTS = [
    "The quick brown fox",
    "import numpy as np\nx = np.",
    "Dear Sir or Madam, I am writing to",
    "The mitochondria is the",
    "SELECT name, age FROM users WHERE",
    "In 1492, Columbus",
    "Q: What is 12 times 12?\nA:",
    "The best way to learn a language is",
    "<html>\n<head>\n<title>",
    "Roses are red, violets are",
    "The theory of relativity states that",
    "Once there was a robot who",
]


def prompt_ids(engine: Any, prompt: dict[str, str]) -> list[int]:
    """A reference prompt's ids: {"kind": "chat", "text"} as one user message through the
    model's chat template (as `chat` renders it), {"kind": "raw", "text"} as `generate` takes a
    string."""
    if prompt["kind"] == "chat":
        text = engine.apply_chat_template([{"role": "user", "content": prompt["text"]}])
        return engine.tokenize(text, add_special=False)
    return engine.tokenize(prompt["text"])


def greedy_tokens(engine: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens after each prompt, end of sequence ignored, all prompts at once."""
    from llama_runtime.bench import generate_all

    done = generate_all(engine, prompts, max_tokens=n, temperature=0, ignore_eos=True)
    return [c.token_ids for c in done]


def agreement(got: list[list[int]], want: list[list[int]], texts: list[str],
              margins: list[list[float]]) -> dict[str, Any]:
    """Whole continuations and first tokens equal, and where each other one first differs (with
    the reference's margin there: how near a tie that step was)."""
    divergent = []
    for text, g, w, m in zip(texts, got, want, margins, strict=True):
        step = next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), None)
        if step is not None:
            divergent.append({"prompt": text, "first_divergent_step": step,
                              "reference_margin": m[step]})
    return {"prompts": len(want), "continuations_equal": len(want) - len(divergent),
            "first_tokens_equal": sum(g[0] == w[0] for g, w in zip(got, want, strict=True)),
            "divergent": divergent}


def transformers_greedy(path: str, prompts: list[list[int]], n: int,
                        threads: int) -> tuple[list[list[int]], list[list[float]]]:
    """The float reference: transformers in float32 on the dequantized GGUF, greedy step by
    step (`generate(min_new_tokens=...)` would mask end of sequence, which we ignore). Returns
    each prompt's tokens and, at each step, the margin of the chosen token's logit over the
    runner-up's (how near a tie the step was)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    tokens_all, margins_all = [], []
    with torch.inference_mode():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens: list[int] = []
            margins: list[float] = []
            while True:
                top2 = out.logits[0, -1].topk(2)
                tokens.append(int(top2.indices[0]))
                margins.append(round(float(top2.values[0] - top2.values[1]), 6))
                if len(tokens) == n:
                    break
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                            use_cache=True)
            tokens_all.append(tokens)
            margins_all.append(margins)
    return tokens_all, margins_all


def dump_reference(data: dict[str, Any]) -> str:
    """REFERENCE's text: its header, then one prompt a line (readable diffs)."""
    head = "".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n"
                   for k, v in data.items() if k != "prompts")
    prompts = ",\n  ".join(json.dumps(p, ensure_ascii=False) for p in data["prompts"])
    return "{\n" + head + ' "prompts": [\n  ' + prompts + "\n ]\n}\n"


def _errors(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "max_abs": float(np.abs(got - ref).max())}


def _llama_cpp_logits(path: str, threads: int) -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the context's own buffer
        return np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float32)

    return logits


def _summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": round(min(r[k] for r in rows), 6),
                "median": round(statistics.median(r[k] for r in rows), 6),
                "max": round(max(r[k] for r in rows), 6)} for k in rows[0]}


def logit_errors(engines: dict[str, Any], ref: Any, default: Any, steps: int,
                 threads: int) -> dict[str, Any]:
    """Part 2: each quantized mode's (and llama.cpp's) last logits against `ref` (exact), after
    each context and `steps` greedy tokens of `default` (the default engine)."""
    contexts = []
    for text in CONTEXTS:
        ids = default.tokenize(text)
        contexts.append(ids + greedy_tokens(default, [ids], steps)[0])
    peer = _llama_cpp_logits(ref.model.path, threads)
    per_context = []
    for text, ids in zip(CONTEXTS, contexts, strict=True):
        want = prompt_logits(ref, ids)
        row: dict[str, Any] = {"context": text, "tokens": len(ids)}
        for mode, engine in engines.items():
            if mode != "exact":
                row[mode] = _errors(prompt_logits(engine, ids), want)
        if peer is not None:
            row["llama_cpp"] = _errors(peer(ids), want)
        per_context.append(row)
    names = [k for k in per_context[0] if k not in ("context", "tokens")]
    out: dict[str, Any] = {"steps": steps,
                           "summary": {k: _summary([r[k] for r in per_context]) for k in names},
                           "contexts": per_context}
    if peer is None:
        out["note"] = "llama-cpp-python is not installed (pip install -e '.[bench]')"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens a prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", choices=["live", "cached"], default="live",
                    help="run transformers here, or read its tokens from REFERENCE")
    ap.add_argument("--write-reference", action="store_true",
                    help="store the live reference in REFERENCE (for the tests)")
    ap.add_argument("--logit-steps", type=int, default=8,
                    help="greedy tokens after each logit context's prompt (0: skip part 2)")
    ap.add_argument("--modes", nargs="*", default=["mixed", "int16", "int8", "exact"])
    args = ap.parse_args()
    if args.write_reference and args.reference != "live":
        ap.error("--write-reference stores a live reference: drop --reference cached")

    from llama_runtime import create_engine
    from llama_runtime.backends import CPU_DECODE

    def engine(mode: str) -> Any:
        if mode.startswith("torch-"):  # the CUDA path's arithmetic, on the CPU
            return create_engine(args.model, threads=args.threads, progress=False,
                                 backend="torch", device="cpu", weights="dequant",
                                 dtype=mode.removeprefix("torch-"))
        return create_engine(args.model, threads=args.threads, progress=False, decode=mode)

    engines = {mode: engine(mode) for mode in dict.fromkeys([*args.modes, "exact"])}
    ref_engine = engines["exact"]
    data = json.loads(REFERENCE.read_text())
    prompts = [prompt_ids(ref_engine, p) for p in data["prompts"]]
    texts = [p["text"] for p in data["prompts"]]
    if args.reference == "live":
        want, margins = transformers_greedy(ref_engine.model.path, prompts, args.tokens,
                                            args.threads)
    else:
        if [p["ids"] for p in data["prompts"]] != prompts:
            raise SystemExit(f"{REFERENCE}: its prompt ids are not this tokenizer's; rerun "
                             "with --write-reference")
        want = [p["tokens"][:args.tokens] for p in data["prompts"]]
        margins = [p["margins"][:args.tokens] for p in data["prompts"]]
    out: dict[str, Any] = {
        "model": args.model, "tokens": args.tokens,
        "reference": f"transformers float32 on the dequantized GGUF ({args.reference})",
        "greedy": {mode: agreement(greedy_tokens(engines[mode], prompts, args.tokens), want,
                                   texts, margins) for mode in args.modes},
    }
    if args.logit_steps > 0:
        default = engines.get(CPU_DECODE) or create_engine(args.model, threads=args.threads,
                                                           progress=False)
        out["logits_vs_exact"] = logit_errors(
            {m: e for m, e in engines.items() if m in args.modes and m != "mixed"}, ref_engine,
            default,
            args.logit_steps, args.threads)
    if args.write_reference:
        for p, ids, tokens, m in zip(data["prompts"], prompts, want, margins, strict=True):
            p["ids"], p["tokens"], p["margins"] = ids, tokens, m
        data["model"], data["tokens"] = args.model, args.tokens
        data["reference"] = ("transformers float32 on the dequantized GGUF, greedy, end of "
                             "sequence ignored (bench/int8_error.py --write-reference)")
        REFERENCE.write_text(dump_reference(data))
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
