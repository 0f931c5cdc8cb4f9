"""mlx-lm as a peer in bench/peers.py: its Llama model built from the same GGUF file our engine
loads, timed on its own generation path (generate_step: one prompt call into a KV cache, then one
token a step, greedy).

mlx-lm has no GGUF loader, but MLX reads GGUF itself: `mx.load(path, return_metadata=True)`
returns Q4_0 / Q4_1 / Q8_0 tensors already in MLX's affine layout (`<name>.weight` packed codes,
`<name>.scales`, `<name>.biases`, group size 32, float16 scales as the file stores them), so
`load_gguf_llama` only renames tensors, undoes the converter's Q/K row permutation, quantizes the
module tree to match and loads the arrays.
"""

from __future__ import annotations

import re
import resource
import statistics
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = ["load_gguf_llama", "run_mlx_lm"]

_GROUP = 32
"""Elements per scale and bias in MLX's view of GGUF's quantized blocks."""

_RENAME = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _mlx_lm_name(name: str) -> str:
    """A GGUF tensor name ("blk.3.attn_q.scales") -> mlx-lm's ("model.layers.3.self_attn.q_proj
    .scales")."""
    base, _, part = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _RENAME:
        return f"model.layers.{m.group(1)}.{_RENAME[m.group(2)]}.{part}"
    if base in _TOP:
        return f"{_TOP[base]}.{part}"
    raise ValueError(f"no mlx-lm llama name for GGUF tensor {name!r}")


def _unpermute_rows(a: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's convert permute(): per head, GGUF row 2i + j -> HF row
    j * head_dim / 2 + i."""
    rows = a.shape[0]
    return a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _meta_value(v: Any) -> Any:
    return v.item() if isinstance(v, mx.array) else v


def load_gguf_llama(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """An mlx-lm `llama.Model` holding a Llama-architecture GGUF's weights as the file stores
    them (quantized tensors stay quantized, 4 or 8 bits per tensor, group 32), and its config.

    llama.cpp's converter permutes the rows of every Llama attn_q / attn_k weight so that each
    head's rotary pairs sit side by side (GGUF's interleaved RoPE, dims 2i and 2i + 1), while
    mlx-lm's llama applies HF's non-interleaved "rotate half" RoPE (dims i and i + head_dim/2).
    Loading the file as is would rotate the wrong pairs, so the permutation is undone here. It
    moves whole rows, and a quantization group (32 elements) lies within a row, so the packed
    codes, scales and biases of a quantized tensor are permuted alike with no requantization.
    """
    from mlx_lm.models import llama

    weights, meta = mx.load(path, return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, this loader builds only 'llama'")

    def get(key: str, default: Any = None) -> Any:
        return _meta_value(meta.get(f"{arch}.{key}", default))

    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: RoPE scaling {get('rope.scaling.type')!r} is not mapped")
    dim, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(get("attention.key_length", dim // n_head)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in weights,
    }
    out: dict[str, mx.array] = {}
    for name, a in weights.items():
        if ".attn_q." in name:
            a = _unpermute_rows(a, n_head)
        elif ".attn_k." in name:
            a = _unpermute_rows(a, n_kv)
        out[_mlx_lm_name(name)] = a

    model = llama.Model(llama.ModelArgs.from_dict(config))

    def quantized(prefix: str, module: nn.Module) -> bool | dict[str, Any]:
        scales = out.get(f"{prefix}.scales")
        if scales is None:
            return False
        # packed uint32 words per row / groups per row = bits per element
        return {"group_size": _GROUP, "bits": out[f"{prefix}.weight"].shape[1] // scales.shape[1]}

    nn.quantize(model, class_predicate=quantized)
    model.load_weights(list(out.items()), strict=True)
    mx.eval(model.parameters())
    return model, config


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mlx_lm(job: dict[str, Any]) -> dict[str, Any]:
    """peers.py's figures for mlx-lm: the prompt through generate_step (its prompt pass, then
    one token a step, greedy, the next step queued while the current one is read) for exactly
    job["gen"] tokens; TTFT is the first token's time, decode tok/s the rest's; --repeats runs
    from an empty cache each, decode_tok_s their median."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    prompt, gen = job["prompt"], job["gen"]
    t0 = time.perf_counter()
    model, _ = load_gguf_llama(job["path"])
    load_s = time.perf_counter() - t0
    greedy = make_sampler(temp=0.0)

    def one_request(ids: list[int], n: int) -> tuple[list[int], float, float]:
        """(tokens, TTFT in seconds, seconds for the n - 1 tokens after the first)."""
        cache = make_prompt_cache(model)
        tokens: list[int] = []
        t0 = time.perf_counter()
        t_first = t0
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=greedy,
                                    prompt_cache=cache):
            if not tokens:
                t_first = time.perf_counter()
            tokens.append(int(tok))
        return tokens, t_first - t0, time.perf_counter() - t_first

    one_request(prompt[:16], 4)  # warm-up
    tokens, ttft, decode_s = one_request(prompt, gen)
    decode = [(gen - 1) / decode_s] + [
        (gen - 1) / one_request(prompt, gen)[2] for _ in range(job["repeats"] - 1)]
    return {"backend": f"mlx {mx.__version__} ({mx.default_device()})",
            "load_s": load_s, "prefill_tok_s": len(prompt) / ttft, "ttft_ms": ttft * 1e3,
            "decode_tok_s": statistics.median(decode), "decode_tok_s_runs": decode,
            "tokens": tokens, "peak_rss_mb": _rss_mb()}
