"""Attention through the paged store equals plain attention over contiguous K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_runtime.step import SeqStep
from llama_runtime.torch_backend.paged import PagedKVStore, StepBatch

L, HQ, HKV, D, BS = 2, 6, 2, 8, 4


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    # q [n, HQ, D] at positions start..start+n-1; k, v [start+n, HKV, D]
    n = q.shape[0]
    mask = torch.ones((n, start + n), dtype=torch.bool).tril(start)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=True, scale=0.3)
    return out[0].transpose(0, 1).reshape(n, -1)


def test_mixed_decode_and_prefill_step_matches_contiguous() -> None:
    torch.manual_seed(0)
    store = PagedKVStore(L, HKV, D, num_blocks=40, block_size=BS, device=torch.device("cpu"),
                         dtype=torch.float32)
    store.k.fill_(float("nan"))  # slots never written hold whatever torch.empty gave: here NaN,
    store.v.fill_(float("nan"))  # which padding must not let through
    # three sequences with scattered, non-contiguous blocks
    lengths = {"a": 37, "b": 16, "c": 9}  # tokens already cached
    new = {"a": 1, "b": 5, "c": 1}        # tokens this step
    free = list(range(39, -1, -1))
    blocks = {s: [free.pop(0) for _ in range(-(-(lengths[s] + new[s]) // BS))] for s in lengths}
    slots = {s: [blocks[s][p // BS] * BS + p % BS for p in range(lengths[s] + new[s])]
             for s in lengths}
    full_k = {s: torch.randn(lengths[s] + new[s], HKV, D) for s in lengths}
    full_v = {s: torch.randn(lengths[s] + new[s], HKV, D) for s in lengths}
    layer = 1
    for s in lengths:  # the cached part, as earlier steps would have written it
        blk, off = store.at(slots[s][: lengths[s]])
        store.k[layer][blk, :, off] = full_k[s][: lengths[s]]
        store.v[layer][blk, :, off] = full_v[s][: lengths[s]]
    seqs = [SeqStep(start=lengths[s], n_new=new[s], write_slots=slots[s][lengths[s]:],
                    context_slots=slots[s], want_logits=True) for s in lengths]
    batch = StepBatch(store, seqs)
    qs = {s: torch.randn(new[s], HQ, D) for s in lengths}
    q = torch.cat([qs[s] for s in lengths])
    k = torch.cat([full_k[s][lengths[s]:] for s in lengths])
    v = torch.cat([full_v[s][lengths[s]:] for s in lengths])
    out = batch.attend(q, k, v, layer, scale=0.3)
    want = torch.cat([_reference(qs[s], full_k[s], full_v[s], lengths[s]) for s in lengths])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert batch.logits_rows.tolist() == [0, 5, 6]
