"""Turning vocabulary pieces back into the raw bytes they stand for.

Three spellings exist in the vocabularies we read:

- byte-level BPE (GPT-2 and its descendants): every byte is written as one printable character
  from the `bytes_to_unicode` table, so "Ġhello" is b" hello";
- SentencePiece: a space is written as "▁" (U+2581) and bytes without a piece of their own are
  byte tokens "<0xXX>";
- WordPiece: a piece continuing a word starts with "##"; any other piece starts a new word.

Special and user-defined tokens are written as their plain text in every scheme.
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "SPM_SPACE",
    "byte_level_piece_bytes",
    "bytes_to_unicode",
    "parse_byte_token",
    "spm_piece_bytes",
]

SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in the vocabulary."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.cache
def _byte_level_translation() -> dict[int, int]:
    # Maps each alphabet character to the code point of the byte it spells, so that
    # `piece.translate(table).encode("latin-1")` gives the bytes in one C-level pass. A character
    # outside the alphabet in U+0080..U+00FF would come out as one wrong byte, so it is sent to a
    # code point latin-1 cannot encode, which makes the caller take the slow, exact path.
    table = {ord(c): b for b, c in bytes_to_unicode().items()}
    alphabet = set(bytes_to_unicode().values())
    for cp in range(0x80, 0x100):
        if chr(cp) not in alphabet:
            table[cp] = 0x110000 - 1
    return table


def byte_level_piece_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE piece spells; characters outside the alphabet stay UTF-8."""
    try:
        return piece.translate(_byte_level_translation()).encode("latin-1")
    except UnicodeEncodeError:
        decoder = _unicode_to_byte()
        out = bytearray()
        for ch in piece:
            b = decoder.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)


def parse_byte_token(piece: str) -> int | None:
    """The byte a "<0xXX>" byte token stands for, or None if `piece` is not one."""
    m = _BYTE_TOKEN.fullmatch(piece)
    return int(m.group(1), 16) if m else None


def spm_piece_bytes(piece: str, *, space: str = SPM_SPACE) -> bytes:
    """The bytes a SentencePiece-style piece spells: "<0xXX>" is that byte, "▁" is a space."""
    b = parse_byte_token(piece)
    if b is not None:
        return bytes((b,))
    return piece.replace(space, " ").encode("utf-8")
