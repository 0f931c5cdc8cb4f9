"""llguidance vs xgrammar on llama-engine's tokenizers (SmolLM2 49k BPE, gemma3 262k SPM).

python bench/grammar_engines.py [model ...]   (CPU only, ~1 min, <=2 threads; needs
    pip install llguidance, and pip install --no-deps xgrammar apache-tvm-ffi)

The measurement behind choosing llguidance for constrained decoding (issue 17).

Per model: build tokenizer info (HF tokenizer.json path and raw-vocab path), compile a JSON
schema, then feed the tokens of a valid answer one at a time, timing the mask fill per step,
checking that each token is allowed by the mask and accepted, that EOS is allowed at the end,
and that an invalid first token is rejected. Also: batched fill (8 requests), numpy apply,
and whether a mask fill releases the GIL.
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time

import numpy as np

from llama_models import resolve_model_path
from llama_models.checkpoint import read_checkpoint
from llama_tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": ["active", "inactive", "pending"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "tags", "status", "address"],
    "additionalProperties": False,
}
ANSWER = json.dumps({
    "name": "Ada Lovelace, Countess of Lovelace (née Byron)",
    "tags": ["mathematician", "writer", "analytical engine", "first programmer", "poetry",
             "Babbage", "notes on the Menabrea memoir", "Bernoulli numbers", "London", "1815"],
    "status": "inactive",
    "age": 36,
    "address": {"city": "London – St James's Square", "zip": "SW1Y 4JU"},
}, ensure_ascii=False)
INVALID_FIRST = "hello"  # an answer must start with '{'
THREADS = 2


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def bit(mask_row: np.ndarray, tok: int) -> bool:
    return bool((int(mask_row[tok >> 5]) >> (tok & 31)) & 1)


def apply_numpy(logits: np.ndarray, mask: np.ndarray) -> None:
    """Fast numpy apply of an int32 bitmask (B, ceil(V/32)) to float logits (B, V)."""
    allowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    np.putmask(logits, allowed == 0, -np.inf)


def gil_free_fraction(fill_once) -> float:
    """Run fill_once in a thread for ~0.4 s while the main thread counts in pure Python;
    returns main-thread progress relative to running alone (1.0 = GIL fully released)."""
    def count(deadline):
        n = 0
        while time.perf_counter() < deadline:
            n += 1
        return n
    base = count(time.perf_counter() + 0.4)
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            fill_once()
    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.01)
    n = count(time.perf_counter() + 0.4)
    stop.set()
    t.join()
    return n / base


def load(model):
    tok = Tokenizer.from_gguf_metadata(read_checkpoint(resolve_model_path(model)).metadata)
    pieces = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
    return tok, pieces


# ---------------------------------------------------------------------------------------------
def run_llguidance(tok, pieces, ids, bad_ids, eog):
    import llguidance as llg
    import llguidance.numpy as lln
    out = {}
    # (a) HF tokenizers JSON (no transformers needed: LLTokenizer takes the serialized JSON)
    t = time.perf_counter()
    lt_hf = llg.LLTokenizer(tok._backend.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(eog))
    out["tokinfo_hf_s"] = time.perf_counter() - t

    # (b) raw vocabulary via TokenizerWrapper (needs an encode callable for forced text)
    class Raw:
        def __init__(self):
            self.eos_token_id = tok.eos_id
            self.bos_token_id = tok.bos_id
            self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
            self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]

        def __call__(self, s):
            return tok.encode(s, add_special=False, parse_special=False)
    t = time.perf_counter()
    lt_raw = llg.LLTokenizer(llg.TokenizerWrapper(Raw()), eos_token=sorted(eog))
    out["tokinfo_raw_s"] = time.perf_counter() - t

    t = time.perf_counter()
    grm = llg.LLMatcher.grammar_from_json_schema(SCHEMA)
    m = llg.LLMatcher(lt_raw, grm, log_level=1)
    out["compile_s"] = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)
    bad = m.deep_copy()
    lln.fill_next_token_bitmask(bad, mask)
    out["reject_invalid"] = (not bit(mask[0], bad_ids[0])) and not bad.consume_token(bad_ids[0])
    times, ok = [], True
    for tid in ids:
        t = time.perf_counter()
        lln.fill_next_token_bitmask(m, mask)
        times.append(time.perf_counter() - t)
        ok &= bit(mask[0], tid) and m.consume_token(tid)
    lln.fill_next_token_bitmask(m, mask)
    ok &= m.is_accepting() and bit(mask[0], tok.eos_id) and m.consume_token(tok.eos_id)
    out["accept_all"] = ok and m.is_stopped() and not m.is_error()
    out["steps"] = times
    # same with the HF-json tokenizer (correctness only)
    m2 = llg.LLMatcher(lt_hf, grm)
    out["accept_all_hf"] = m2.consume_tokens(ids) and m2.is_accepting()
    # rollback
    m.rollback(3)
    out["rollback_ok"] = not m.is_error() and m.consume_tokens([*ids[-2:], tok.eos_id])

    # batched: 8 requests at different positions
    ex = llg.LLExecutor(num_threads=THREADS)
    ms = []
    for k in range(8):
        mk = llg.LLMatcher(lt_raw, grm)
        mk.consume_tokens(ids[: 10 * k])
        ms.append(mk)
    bm = lln.allocate_token_bitmask(8, tok.vocab_size)
    bt = []
    for _ in range(20):
        t = time.perf_counter()
        lln.fill_next_token_bitmask_par(ex, [(mk, i) for i, mk in enumerate(ms)], bm)
        bt.append(time.perf_counter() - t)
    out["batch8_ms"] = statistics.mean(bt) * 1e3
    ex1 = llg.LLExecutor(num_threads=1)
    big = [(ms[k % 8].deep_copy(), k) for k in range(64)]
    bm64 = lln.allocate_token_bitmask(64, tok.vocab_size)
    out["gil"] = gil_free_fraction(lambda: lln.fill_next_token_bitmask_par(ex1, big, bm64))
    out["other"] = other_llg(llg, lln, lt_raw, tok)
    return out, bm


def run_xgrammar(tok, pieces, ids, bad_ids, eog):
    import xgrammar as xgr
    out = {}
    # (a) HF tokenizers JSON: detect vocab type from the serialized tokenizer, vocab from it too
    t = time.perf_counter()
    backend = tok._backend
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    vocab = [""] * tok.vocab_size
    for s, i in backend.get_vocab(with_added_tokens=True).items():
        if i < tok.vocab_size:
            vocab[i] = s
    ti_hf = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=tok.vocab_size,
                              stop_token_ids=sorted(eog), add_prefix_space=meta["add_prefix_space"])
    out["tokinfo_hf_s"] = time.perf_counter() - t
    # (b) raw vocabulary: decoded bytes, control tokens as b"" (xgrammar treats "" as special)
    t = time.perf_counter()
    ti = xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                           stop_token_ids=sorted(eog), add_prefix_space=False)
    out["tokinfo_raw_s"] = time.perf_counter() - t

    comp = xgr.GrammarCompiler(ti, max_threads=THREADS, cache_enabled=False)
    t = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(SCHEMA))
    out["compile_s"] = time.perf_counter() - t
    m = xgr.GrammarMatcher(cg)
    mask = np.full(xgr.get_bitmask_shape(1, tok.vocab_size), -1, dtype=np.int32)  # numpy via DLPack
    m.fill_next_token_bitmask(mask)
    bad = m.fork()
    out["reject_invalid"] = (not bit(mask[0], bad_ids[0])) and not bad.accept_token(bad_ids[0])
    times, ok = [], True
    for tid in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t)
        ok &= bit(mask[0], tid) and m.accept_token(tid)
    m.fill_next_token_bitmask(mask)
    ok &= m.is_completed() and bit(mask[0], tok.eos_id) and m.accept_token(tok.eos_id)
    out["accept_all"] = ok and m.is_terminated()
    out["steps"] = times
    cg_hf = xgr.GrammarCompiler(ti_hf, max_threads=THREADS).compile_json_schema(json.dumps(SCHEMA))
    m2 = xgr.GrammarMatcher(cg_hf)
    out["accept_all_hf"] = all(m2.accept_token(i) for i in ids) and m2.is_completed()
    m.rollback(3)
    out["rollback_ok"] = all(m.accept_token(i) for i in [*ids[-2:], tok.eos_id])

    bgm = xgr.BatchGrammarMatcher(max_threads=THREADS)
    ms = []
    for k in range(8):
        mk = xgr.GrammarMatcher(cg)
        for i in ids[: 10 * k]:
            mk.accept_token(i)
        ms.append(mk)
    bm = np.full(xgr.get_bitmask_shape(8, tok.vocab_size), -1, dtype=np.int32)
    bt = []
    for _ in range(20):
        t = time.perf_counter()
        bgm.batch_fill_next_token_bitmask(ms, bm)
        bt.append(time.perf_counter() - t)
    out["batch8_ms"] = statistics.mean(bt) * 1e3
    bgm1 = xgr.BatchGrammarMatcher(max_threads=1)
    big = [ms[k % 8].fork() for k in range(64)]
    bm64 = np.full(xgr.get_bitmask_shape(64, tok.vocab_size), -1, dtype=np.int32)
    out["gil"] = gil_free_fraction(lambda: bgm1.batch_fill_next_token_bitmask(big, bm64))
    out["other"] = other_xgr(xgr, ti, tok)
    return out, bm


OTHER = [  # (kind, source, a valid answer)
    ("regex", r"\d{3}-\d{4}( ext\. \d+)?", "555-0199 ext. 42"),
    ("choice", ["yes", "no", "maybe later"], "maybe later"),
    ("lark", 'start: "SELECT " COL (", " COL)* " FROM " NAME\nCOL: /[a-z_]+/\nNAME: /[A-Z][a-z]+/',
     "SELECT id, first_name FROM Users"),
]


def other_llg(llg, lln, lt, tok):
    res = []
    for kind, src, ans in OTHER:
        t = time.perf_counter()
        g = (llg.grammar_from("choice", json.dumps(src)) if kind == "choice"
             else llg.grammar_from(kind, src))
        m = llg.LLMatcher(lt, g)
        dt = time.perf_counter() - t
        ok = m.consume_tokens(tok.encode(ans, add_special=False)) and m.is_accepting()
        res.append(f"{kind} {dt*1e3:.1f}ms {'ok' if ok else 'FAIL ' + m.get_error()}")
    return ", ".join(res)


def other_xgr(xgr, ti, tok):
    comp = xgr.GrammarCompiler(ti, max_threads=THREADS, cache_enabled=False)
    res = []
    for kind, src, ans in OTHER:
        t = time.perf_counter()
        if kind == "regex":
            cg = comp.compile_regex(src)
        elif kind == "choice":  # no choice API: a regex alternation of escaped literals
            import re
            cg = comp.compile_regex("|".join(re.escape(c) for c in src))
        else:
            cg = comp.compile_lark(src)
        dt = time.perf_counter() - t
        m = xgr.GrammarMatcher(cg)
        ok = all(m.accept_token(i) for i in tok.encode(ans, add_special=False)) and m.is_completed()
        res.append(f"{kind} {dt*1e3:.1f}ms {'ok' if ok else 'FAIL'}")
    return ", ".join(res)


def main(models: list[str]) -> None:
    """One JSON object: per model, each engine's figures (times in ms, per-step masks in us)."""
    report: dict[str, object] = {}
    for model in models:
        t = time.perf_counter()
        tok, pieces = load(model)
        ids = tok.encode(ANSWER, add_special=False)
        bad_ids = tok.encode(INVALID_FIRST, add_special=False)
        eog = set(tok.eog_ids)
        entry: dict[str, object] = {"vocab": tok.vocab_size, "answer_tokens": len(ids),
                                    "load_s": round(time.perf_counter() - t, 2)}
        for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
            r, bm = fn(tok, pieces, ids, bad_ids, eog)
            st = [x * 1e6 for x in r.pop("steps")]
            entry[name] = {
                "tokenizer_info_hf_ms": round(r["tokinfo_hf_s"] * 1e3, 1),
                "tokenizer_info_raw_ms": round(r["tokinfo_raw_s"] * 1e3, 1),
                "compile_schema_ms": round(r["compile_s"] * 1e3, 2),
                "mask_us": {"mean": round(statistics.mean(st), 1), "p95": round(pct(st, 95), 1),
                            "max": round(max(st), 1), "first": round(st[0], 1)},
                "batch8_ms": round(r["batch8_ms"], 3),
                "accepts_answer": r["accept_all"], "accepts_answer_hf": r["accept_all_hf"],
                "rejects_invalid": r["reject_invalid"], "rollback_ok": r["rollback_ok"],
                "main_thread_progress_during_fill": round(r["gil"], 2),
                "other_grammars": r["other"],
            }
        logits = np.random.randn(8, tok.vocab_size).astype(np.float32)
        t = time.perf_counter()
        for _ in range(10):
            apply_numpy(logits, bm)
        entry["numpy_apply_8_rows_ms"] = round((time.perf_counter() - t) / 10 * 1e3, 3)
        report[model] = entry
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m-instruct", "gemma3-270m"])
