"""A loaded GGUF's pages leave the resident set once the backend holds its own copy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from llama_models import resolve_model_path
from llama_models.checkpoint import read_gguf, release_pages


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_pages_drops_a_tensors_file_pages() -> None:
    ckpt = read_gguf(resolve_model_path("smollm2-135m-instruct"))
    emb = ckpt.tensors["token_embd.weight"].data  # ~30 MB, memory-mapped
    checksum = int(np.asarray(emb, dtype=np.uint8).sum(dtype=np.uint64))  # touch every page
    before = _rss_file_mb()
    release_pages(emb)
    assert _rss_file_mb() < before - 20
    # the data is still readable (re-read from the page cache)
    assert int(np.asarray(emb, dtype=np.uint8).sum(dtype=np.uint64)) == checksum
    release_pages(np.zeros(10))  # not file-backed: nothing to do
