"""Where one decode step's time goes, per op, after a prompt of --context tokens (or, with
--phase prompt, where the prompt chunks' steps go).

    python bench/decode_profile.py [--decode mixed|int16|int8|exact|torch] [--context 512]
                                   [--steps 64] [--batch 1] [--threads 2] [--phase decode|prompt]

decode mixed / int16 / int8 / exact (the fused native step): the step's own per-phase timers
(csrc/decode.cpp). decode torch (op by op): the torch profiler around each forward on the
scheduler thread, self CPU time per aten op. Also the whole step as the scheduler sees it
(Python bookkeeping and sampling included). Prints JSON; microseconds per step.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict
from typing import Any

from llama_engine import SamplingParams
from llama_runtime import create_engine
from llama_runtime.bench import make_prompt
from llama_runtime.torch_backend.fused import DECODE_KERNELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--decode", default="mixed", choices=[*DECODE_KERNELS, "torch"])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--phase", default="decode", choices=["decode", "prompt"],
                    help="profile decode steps, or the prompt chunks' steps instead")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    # the torch backend: its fused step is the native backend's, with the per-phase timers
    # reachable from Python
    engine: Any = create_engine(args.model, backend="torch", threads=args.threads,
                                progress=False, decode=args.decode)
    prompts = [make_prompt(engine, args.context, variant=i) for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)
    engine.generate(prompts[0][:16], params=params.replace(max_tokens=4))  # warm-up

    step_times: list[float] = []
    per_op: dict[str, float] = defaultdict(float)
    profiled = 0
    backend = engine._backend  # the TorchBackend: its steps are timed by wrapping them
    run_step = backend.step
    forward = backend._forward

    native = backend._fused.fused if args.decode != "torch" else None

    def timed_step(*a: Any) -> Any:
        nonlocal profiled
        # one new token each: a decode step; else prompt chunks (the same native step)
        decoding = all(s.n_new == 1 for s in a[2])
        counted = decoding == (args.phase == "decode")
        before = dict(native.profile()) if native is not None and counted else {}
        t0 = time.perf_counter()
        out = run_step(*a)
        if counted:
            step_times.append(time.perf_counter() - t0)
            if native is not None:
                for k, v in native.profile().items():
                    if k != "steps":
                        per_op[k] += v - before.get(k, 0.0)
                profiled += 1
        return out

    def profiled_forward(tokens: list[int], positions: list[int], seqs: Any) -> Any:
        nonlocal profiled
        if not all(s.n_new == 1 for s in seqs):
            return forward(tokens, positions, seqs)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = forward(tokens, positions, seqs)
        for ev in prof.key_averages():
            per_op[ev.key] += ev.self_cpu_time_total
        profiled += 1
        return out

    backend.step = timed_step
    if args.decode == "torch":
        backend._forward = profiled_forward
    else:
        native.set_profiling(True)

    def one(p: list[int]) -> None:
        engine.generate(p, params=params)

    workers = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    steps = max(profiled, 1)
    ops = {k: v / steps for k, v in per_op.items()}
    total = sum(ops.values())
    step_us = sorted(step_times)[len(step_times) // 2] * 1e6 if step_times else None
    print(json.dumps({
        "model": args.model, "decode": args.decode, "phase": args.phase, "context": args.context,
        "batch": args.batch, "threads": args.threads, "steps_profiled": steps,
        "step_us_median": round(step_us, 1) if step_us else None,
        "tok_s_from_step": round(1e6 * args.batch / step_us, 1) if step_us else None,
        "ops_us_per_step": {k: round(v, 1) for k, v in
                            sorted(ops.items(), key=lambda kv: -kv[1])[:15]},
        "ops_share": {k: round(v / total, 3) for k, v in
                      sorted(ops.items(), key=lambda kv: -kv[1])[:15]},
    }, indent=2))


if __name__ == "__main__":
    main()
