"""Per-matrix timings of the CPU kernels (csrc/qgemm.cpp), the products one layer of a model makes.

    python bench/kernels.py [--model smollm2-135m-instruct] [--layer 3] [--rows 1 16 512]
                            [--threads 2]

For each of the layer's weights and each activation row count: milliseconds per product and
GFLOP/s for each kernel: int16 and int8 (activations quantized per 32-block, the time includes
quantizing them) and float ("exact"). Runs the native library (no torch); LLAMA_ENGINE_ISA picks
another build (avx512-vnni, avx2, generic). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

LINEARS = ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_down")


def _time(f: object, budget_s: float = 0.3) -> float:
    f()  # warm-up: buffers, caches
    reps, t0 = 0, time.perf_counter()
    while True:
        f()
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed > budget_s and reps >= 3:
            return elapsed / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 16, 512])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama_models import open_model
    from llama_runtime.kernels.api import linear
    from llama_runtime.kernels.layout import pack
    from llama_runtime.kernels.library import ACTS, isa, library

    library().le_set_threads(args.threads)
    weights = open_model(args.model).weights
    results = []
    for name in LINEARS:
        raw = weights[f"blk.{args.layer}.{name}.weight"]
        packed = pack(raw)
        n, k = raw.shape
        for rows in args.rows:
            x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
            row: dict[str, object] = {"weight": name, "shape": [n, k], "rows": rows}
            for kernel in ACTS:
                s = _time(lambda p=packed, x=x, a=kernel: linear(p, x, acts=a))
                row[f"{kernel}_ms"] = round(s * 1e3, 4)
                row[f"{kernel}_gflops"] = round(2 * n * k * rows / s / 1e9, 1)
            results.append(row)
    print(json.dumps({"model": args.model, "layer": args.layer, "threads": args.threads,
                      "kernels": isa(), "products": results}, indent=2))


if __name__ == "__main__":
    main()
