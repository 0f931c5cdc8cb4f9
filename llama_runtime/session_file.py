"""Saved sessions on disk: an ``.npz`` (a zip of ``.npy`` members) with a header, the tokens and
float32 K/V. Written atomically; read as untrusted data. `saved_slots` / `save_kv` and
`import_kv` move a session between a file and the KV cache (llama_kv's bookkeeping and a
backend's KV store), the same for every backend: the file is float32 whatever the store keeps,
so a session saved on one backend continues on another.

Reading checks everything before the caller allocates anything: the zip's members and their
sizes, each array's ``.npy`` header (dtype, shape) before its data is read, the format and model
in the header, the token count against the context, every id against the vocabulary, the K/V
shapes against what the token count implies, and that K/V are finite. A member's data is read
exactly as many bytes as its checked header implies, so a small file that inflates to gigabytes
is refused after reading at most what a genuine file of that many tokens holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from llama_engine import SessionError

if TYPE_CHECKING:
    from llama_kv import PagedKVCache
    from llama_runtime.backend import KVStore

__all__ = ["SESSION_FORMAT", "SavedSession", "import_kv", "read_session", "save_kv",
           "saved_slots", "write_session"]

SESSION_FORMAT = "llama-engine-session/2"
_MEMBERS = ("header.npy", "tokens.npy", "k.npy", "v.npy")
_MAX_HEADER_BYTES = 64 * 1024
_NPY_HEADER_SLACK = 4096  # a .npy member's own header (magic, dict, padding) is far below this


@dataclass(frozen=True, slots=True)
class SavedSession:
    tokens: list[int]
    k: np.ndarray
    """float32 [layers, len(tokens), kv_heads, head_dim]"""
    v: np.ndarray


def write_session(path: str | os.PathLike[str], *, model: str, tokens: list[int],
                  k: np.ndarray, v: np.ndarray) -> None:
    """Write atomically: a temporary file in the same directory, flushed to disk, then renamed
    over `path`; a failure leaves any previous file at `path` as it was."""
    target = Path(os.fspath(path))
    header = json.dumps({"format": SESSION_FORMAT, "model": model})
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                               dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: savez adds no suffix
            np.savez(f, header=np.array(header), tokens=np.asarray(tokens, dtype=np.int64),
                     k=np.ascontiguousarray(k, dtype=np.float32),
                     v=np.ascontiguousarray(v, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself is durable once the directory is
        dir_fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_session(path: str | os.PathLike[str], *, model: str, context_length: int,
                 vocab_size: int, kv_shape: Callable[[int], tuple[int, ...]]) -> SavedSession:
    """The checked contents of a session file written by `write_session` for `model`.

    `kv_shape(n)` is the K (and V) shape the engine expects for n tokens. Raises SessionError,
    saying what is wrong, for anything else."""
    name = os.fspath(path)
    try:
        archive = zipfile.ZipFile(name)
    except FileNotFoundError as e:
        raise SessionError(f"no saved session at {name}") from e
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise _not_a_session(name, e) from e
    with archive:
        try:
            return _read(archive, name, model=model, context_length=context_length,
                         vocab_size=vocab_size, kv_shape=kv_shape)
        except SessionError:
            raise
        except Exception as e:  # zlib errors, truncated members, bad CRCs, odd headers
            raise _not_a_session(name, e) from e


def _read(archive: zipfile.ZipFile, name: str, *, model: str, context_length: int,
          vocab_size: int, kv_shape: Callable[[int], tuple[int, ...]]) -> SavedSession:
    members = {info.filename: info for info in archive.infolist()}
    if sorted(members) != sorted(_MEMBERS):
        raise _not_a_session(name, f"it holds {sorted(members)[:8]}, not {list(_MEMBERS)}")
    header_arr = _member(archive, members["header.npy"], name, "U", None, _MAX_HEADER_BYTES)
    try:
        header = json.loads(str(header_arr))
    except ValueError as e:
        raise _not_a_session(name, f"its header is not JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != SESSION_FORMAT:
        raise SessionError(
            f"{name} is not a {SESSION_FORMAT} session file; save it again with this version")
    if header.get("model") != model:
        raise SessionError(
            f"{name} was saved from another model ({str(header.get('model'))[:200]!r}); load "
            f"it into an engine running that model (this one runs {model!r})")
    tokens_arr = _member(archive, members["tokens.npy"], name, "i8", None,
                         8 * (context_length + 4096))  # a little over: say "context" below
    if tokens_arr.ndim != 1:
        raise _not_a_session(name, f"its tokens have shape {tokens_arr.shape}, not [n]")
    n = int(tokens_arr.shape[0])
    if n >= context_length:
        raise SessionError(
            f"{name} holds {n} tokens but the context is {context_length}; load it into an "
            "engine with a larger context_length=")
    if n and (int(tokens_arr.min()) < 0 or int(tokens_arr.max()) >= vocab_size):
        bad = int(tokens_arr.min()) if int(tokens_arr.min()) < 0 else int(tokens_arr.max())
        raise SessionError(
            f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}); it was "
            "not written by save_session() for this model")
    want = tuple(kv_shape(n))
    kv = [_member(archive, members[f"{part}.npy"], name, "f4", want,
                  4 * math.prod(want)) for part in ("k", "v")]
    for part, arr in zip("kv", kv, strict=True):
        if not np.isfinite(arr).all():
            raise SessionError(f"{name}: its {part.upper()} cache holds NaN or infinity; it is "
                               "corrupt (save the session again)")
    return SavedSession([int(t) for t in tokens_arr], kv[0], kv[1])


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, kind: str,
            shape: tuple[int, ...] | None, max_data: int) -> np.ndarray:
    """One ``.npy`` member: its header checked (dtype `kind`, `shape` when given, data at most
    `max_data` bytes) before exactly its data's bytes are read."""
    what = info.filename
    if info.file_size > max_data + _NPY_HEADER_SLACK:
        raise _not_a_session(name, f"{what} inflates to {info.file_size} bytes, more than "
                                   f"the {max_data} its place allows")
    with archive.open(info) as f:
        header_shape, fortran, dtype = _npy_header(f)
        ok_kind = dtype.kind == "U" if kind == "U" else dtype == np.dtype(f"<{kind}")
        if not ok_kind or dtype.hasobject or fortran:
            raise _not_a_session(name, f"{what} holds {dtype} data, not {kind}")
        if shape is not None and tuple(header_shape) != shape:
            raise SessionError(
                f"{name} holds {what[:-4].upper()} of shape {tuple(header_shape)}, not {shape};"
                " it was not written by save_session() for this model")
        nbytes = dtype.itemsize * math.prod(header_shape)
        if nbytes > max_data:
            raise _not_a_session(name, f"{what} declares {nbytes} bytes of data, more than "
                                       f"the {max_data} its place allows")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise _not_a_session(name, f"{what} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(header_shape).copy()


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def _not_a_session(name: str, why: object) -> SessionError:
    return SessionError(
        f"{name} is not a saved llama-engine session ({why}); save it again with "
        f"save_session() ({SESSION_FORMAT})")


def saved_slots(cache: PagedKVCache, session_id: str, n: int) -> tuple[list[int], int]:
    """The slots of a session's first n positions, and how many of them it gave back (out of
    every layer's window; never read again). Called with the scheduler's lock held."""
    slots = cache.slot_mapping(session_id, 0, n)
    return slots, min(cache.released_tokens(session_id), n)


def save_kv(path: str | os.PathLike[str], *, store: KVStore, tokens: Sequence[int],
            slots: Sequence[int], released: int, model: str) -> None:
    """Write `tokens` and the K/V at `slots` (saved_slots'), the released positions as zeros.
    The write is atomic: if it fails, a file already at `path` is left as it was."""
    k, v = store.read(slots[released:])
    if released:
        pad = np.zeros(store.kv_shape(released), dtype=k.dtype)
        k, v = (np.concatenate([pad, a], axis=1) for a in (k, v))
    try:
        write_session(path, model=model, tokens=list(tokens), k=k, v=v)
    except OSError as e:
        raise SessionError(f"cannot write the session to {path}: {e}") from e


def import_kv(saved: SavedSession, *, cache: PagedKVCache, store: KVStore,
              session_id: str) -> None:
    """A file read_session checked in full, into new blocks of `session_id` (called with the
    scheduler's lock held), which then holds its tokens. The blocks serve this session only
    (never another's prompt through the prefix cache)."""
    cache.import_session(session_id, saved.tokens)
    try:
        store.write(cache.slot_mapping(session_id, 0, len(saved.tokens)), saved.k, saved.v)
    except BaseException:
        cache.free(session_id)
        raise
    # out of every layer's window (the saved session had given them back): not kept
    cache.release_behind(session_id, len(saved.tokens))
