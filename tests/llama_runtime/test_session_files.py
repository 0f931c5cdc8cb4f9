"""Session files are data, never trust: checked in full before anything is allocated, private
to the session that loads them, written atomically."""

from __future__ import annotations

import io
import json
import resource
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_engine import SessionError

PROMPT = "The history of the Roman empire begins with the founding of the city, which " * 3


@pytest.fixture
def saved(engine, tmp_path) -> Path:
    s = engine.new_session()
    engine.prefill(s, engine.tokenize(PROMPT))
    path = tmp_path / "good.npz"
    engine.save_session(s, path)
    engine.close_session(s)
    return path


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def _write(path: Path, **members: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **members)
    return path


def _used(engine) -> int:
    return engine.stats()["kv_blocks_used"]


def test_a_loaded_sessions_kv_never_serves_another_prompt(engine, saved, tmp_path) -> None:
    """A crafted file's K/V answers only its own session: an unrelated request whose prompt
    starts with the file's tokens computes its own K/V and gives its solo output."""
    solo = engine.generate(PROMPT + "It", max_tokens=12, temperature=0)
    engine.close_session(engine.new_session())
    data = _members(saved)
    data["k"] = np.full_like(data["k"], 3.0)  # attacker-chosen K/V
    data["v"] = np.full_like(data["v"], -2.0)
    poisoned = engine.load_session(_write(tmp_path / "poisoned.npz", **data))
    got = engine.generate(PROMPT + "It", max_tokens=12, temperature=0)
    assert got.token_ids == solo.token_ids
    assert got.usage.cached_tokens == solo.usage.cached_tokens
    # the loaded session itself continues from what the file says
    assert engine.generate(PROMPT + "It", session=poisoned, max_tokens=2).usage.cached_tokens > 0
    engine.close_session(poisoned)
    engine._cache.check()


def _bad_files(saved: Path, tmp_path: Path, vocab: int, ctx: int) -> dict[str, tuple[Path, str]]:
    data = _members(saved)
    n = len(data["tokens"])
    out: dict[str, tuple[Path, str]] = {}

    def case(name: str, phrase: str, **changes: np.ndarray) -> None:
        out[name] = (_write(tmp_path / f"{len(out)}.npz", **{**data, **changes}), phrase)

    case("float64 K", "holds float64 data|inflates to", k=data["k"].astype(np.float64))
    case("float16 V", "holds float16 data", v=data["v"].astype(np.float16))
    case("token outside the vocabulary", "outside the vocabulary",
         tokens=np.array([*data["tokens"][:-1], vocab + 5]))
    case("negative token", "outside the vocabulary", tokens=np.array([-1, *data["tokens"][1:]]))
    case("more tokens than K/V", "of shape", tokens=np.array([*data["tokens"], 1]))
    case("tokens as a matrix", "shape", tokens=data["tokens"].reshape(1, -1))
    case("NaN in K", "NaN", k=np.where(np.arange(data["k"].size).reshape(data["k"].shape) == 7,
                                       np.nan, data["k"]).astype(np.float32))
    case("header not JSON", "not JSON", header=np.array("{nope"))
    case("header of another format", "session file",
         header=np.array(json.dumps({"format": "x/1"})))
    case("object header", "holds object", header=np.array([{"a": 1}], dtype=object))
    case("longer than the context", "context",
         tokens=np.ones(ctx + 3, dtype=np.int64))
    out["extra member"] = (_write(tmp_path / "extra.npz", **data, more=np.zeros(3)), "holds")
    raw = saved.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = (tmp_path / "truncated.npz", "not a saved llama-engine session")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    out["junk"] = (tmp_path / "junk.npz", "not a saved llama-engine session")
    del n
    return out


def test_bad_files_are_refused_before_anything_is_allocated(engine, saved, tmp_path) -> None:
    before = engine.stats()
    cases = _bad_files(saved, tmp_path, engine.model.vocab_size, engine.model.context_length)
    for name, (path, phrase) in cases.items():
        with pytest.raises(SessionError, match=phrase):
            engine.load_session(path)
        now = engine.stats()
        assert (now["kv_blocks_used"], now["sessions_active"]) == (
            before["kv_blocks_used"], before["sessions_active"]), name
    engine.load_session(saved)  # the good one still loads (and is dropped at once)


def _bomb(path: Path, good: Path, inflated: int) -> None:
    """A session file whose K member declares `inflated` bytes of zeros (a few MB on disk)."""
    data = _members(good)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in ("header", "tokens", "v"):
            buf = io.BytesIO()
            np.save(buf, data[name])
            z.writestr(f"{name}.npy", buf.getvalue())
        shape = (inflated // 4,)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        with z.open("k.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            chunk = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(chunk)


def test_a_compressed_bomb_is_refused_without_inflating_it(engine, saved, tmp_path) -> None:
    path = tmp_path / "bomb.npz"
    _bomb(path, saved, 1 << 30)
    assert path.stat().st_size < 8 << 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(SessionError, match="inflates to"):
        engine.load_session(path)
    assert time.perf_counter() - started < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB


def test_a_failed_save_keeps_the_previous_file(engine, saved, monkeypatch) -> None:
    good = saved.read_bytes()
    s = engine.load_session(saved)
    engine.prefill(s, engine.tokenize(PROMPT + " and more text to change it"))

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(SessionError, match="No space left"):
        engine.save_session(s, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == good
    assert sorted(p.name for p in saved.parent.iterdir()) == ["good.npz"]  # no temporary left
    engine.save_session(s, saved)  # and a save that works replaces it
    assert saved.read_bytes() != good
    assert engine.load_session(saved).tokens == s.tokens
    engine.close_session(s)
    with pytest.raises(SessionError, match="cannot write"):
        engine.save_session(engine.new_session(), saved.parent / "missing-dir" / "x.npz")


@pytest.fixture(scope="module")
def saved_bytes(engine, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "seed.npz"
    s = engine.new_session()
    engine.prefill(s, engine.tokenize("A short context to mutate."))
    engine.save_session(s, path)
    engine.close_session(s)
    return path.read_bytes()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_session_files_load_or_fail_typed(engine, saved_bytes, tmp_path, data) -> None:
    """Random byte flips, truncations and splices of a real session file: each loads (and then
    holds exactly its own blocks) or raises SessionError, quickly, allocating nothing."""
    raw = bytearray(saved_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            raw = raw[:at]
        elif op == "splice":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        else:
            raw[at:at + 8] = bytes(8)
        if not raw:
            break
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(bytes(raw))
    before = engine.stats()
    started = time.perf_counter()
    try:
        s = engine.load_session(path)
    except SessionError:
        assert _used(engine) == before["kv_blocks_used"]
    else:
        assert engine.stats()["kv_blocks_used"] >= before["kv_blocks_used"]
        engine.close_session(s)
    assert time.perf_counter() - started < 5
    assert engine.stats()["sessions_active"] == before["sessions_active"]
