"""Tiny random-weight models of each family, made by transformers itself, as HF directories and
as GGUF files written by llama.cpp's own converter; and the greedy-token comparison the family
tests share.

The converter is llama.cpp's convert_hf_to_gguf.py with its gguf-py: from the folder
../shared/tools/llama-cpp-peers.sh fills (LLAMA_CPP_PEERS, default ~/.cache/llama-cpp-peers),
else from the llama-cpp-python 0.3.36 sdist on PyPI (the same llama.cpp), fetched once into
~/.cache/llama-engine-tests. It checks a BPE tokenizer's pre-tokenizer against a list of known
hashes; our tiny models carry SmolLM2's vocabulary re-saved by transformers, whose hash is not on
the list, so that one check is answered "smollm" (what the real SmolLM2 files give); every
tensor name, layout and metadata key is the converter's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_runtime.bench import prompt_logits

LLAMA_CPP_PYTHON = "0.3.36"

_CONVERT = textwrap.dedent("""
    import runpy, sys
    from pathlib import Path
    script = Path(sys.argv.pop(1))
    root = script.resolve().parent
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base
    for c in vars(base).values():
        if isinstance(c, type) and "get_vocab_base_pre" in vars(c):
            c.get_vocab_base_pre = lambda self, tokenizer: "smollm"
    runpy.run_path(str(script), run_name="__main__")
""")


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (see the module docstring)."""
    peers = Path(os.environ.get("LLAMA_CPP_PEERS", Path.home() / ".cache" / "llama-cpp-peers"))
    if (peers / "convert_hf_to_gguf.py").exists():
        return peers / "convert_hf_to_gguf.py"
    cache = Path.home() / ".cache" / "llama-engine-tests"
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                            "-d", str(cache)], check=True)
        wanted = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                  "vendor/llama.cpp/gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if any(w in m.name for w in wanted) and (m.isfile() or m.isdir())]
            tar.extractall(cache, members=members, filter="data")
    return root / "convert_hf_to_gguf.py"


def to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """The HF directory converted by llama.cpp's converter."""
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(converter()), str(hf_dir),
                           "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def rewrite_gguf(src: Path, out: Path, qtype_of: Any = None,
                 uint32_keys: dict[str, int] | None = None) -> Path:
    """A copy of the GGUF `src` (float32 tensors, as to_gguf writes them) with `uint32_keys`
    added and each tensor stored as qtype_of(name, shape) gives (a gguf.GGMLQuantizationType,
    or None to keep it): gguf's quantizer where it has one, else random blocks
    (quant_blocks.random_blocks: the K-quants), so the tensor's values change but the file
    stays a valid model."""
    import gguf
    from quant_blocks import QUANTIZABLE, quantized

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, value in (uint32_keys or {}).items():
        writer.add_uint32(key, value)
    for i, t in enumerate(reader.tensors):
        shape = tuple(int(s) for s in reversed(t.shape))
        data = np.array(t.data, dtype=np.float32).reshape(shape)
        qtype = None if qtype_of is None else qtype_of(t.name, shape)
        if qtype is None:
            writer.add_tensor(t.name, data)
            continue
        if qtype in QUANTIZABLE:  # the tensor's own values, quantized
            payload = gguf.quants.quantize(data, qtype)
        else:
            payload = np.asarray(quantized(qtype, shape[0], shape[1], seed=i).data)
        writer.add_tensor(t.name, payload, raw_shape=payload.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def make_hf_model(out: Path, model_type: str, tokenizer: Any, **extra: Any
                  ) -> torch.nn.Module:
    """A tiny random model of `model_type` saved to `out` with `tokenizer` (a transformers
    tokenizer, or a folder whose tokenizer files are copied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    vocab = len(tokenizer) if not isinstance(tokenizer, Path) else extra.pop("vocab_size")
    shape: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0)
    if model_type == "gemma3":  # multimodal: the text model in text_config, a tiny vision tower
        cfg = AutoConfig.for_model(
            "gemma3", text_config=shape | extra, mm_tokens_per_image=4,
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 28, "patch_size": 14})
    else:
        cfg = AutoConfig.for_model(model_type, **(shape | extra))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms start at one (or zero, for Gemma's 1 + w): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    if isinstance(tokenizer, Path):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).write_bytes((tokenizer / name).read_bytes())
    else:
        tokenizer.save_pretrained(out)
    return model


def assert_same_greedy_tokens(got: list[int], want: list[int], ref: torch.nn.Module,
                              ids: list[int]) -> None:
    """Equal greedy tokens, or equal up to a step where the reference's two best logits are
    closer than float32 summation order can tell apart (a random model's logits are nearly flat:
    over a vocabulary of tens of thousands such ties turn up about once in a hundred steps),
    where ours chose the reference's runner-up."""
    if got == want:
        return
    step = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    with torch.inference_mode():
        logits = ref(torch.tensor([ids + want[:step]])).logits[0, -1].numpy()
    first, second = np.argsort(logits)[::-1][:2]
    gap = float(logits[first] - logits[second])
    assert got[step] == second and gap < 1e-4, (
        f"greedy tokens differ at step {step}: ours {got[step]}, the reference's {want[step]} "
        f"(its top two {first}, {second} are {gap:.2e} apart)")


def assert_last_logits_match(engine: Any, ref: torch.nn.Module, ids: list[int],
                             tol: float = 1e-4) -> np.ndarray:
    """The engine's logits after prefilling `ids` within `tol` of the reference's float32 ones
    at the last position; returns ours."""
    ours = prompt_logits(engine, ids)
    with torch.inference_mode():
        theirs = ref(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(ours - theirs).max() < tol
    return ours
