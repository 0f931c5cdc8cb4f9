"""Tokenizers from SentencePiece `.model` files, encoded by `sentencepiece` itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece

from llama_engine.errors import ConfigError, ModelNotFoundError, WeightLoadError
from llama_tokenizer._limits import (
    MAX_ADDED_TOKEN_BYTES,
    MAX_SPM_BYTES,
    MAX_VOCAB,
    check_file_size,
    check_vocab,
)
from llama_tokenizer._pieces import SPM_SPACE, parse_byte_token
from llama_tokenizer.backends import SentencePieceTokenizer
from llama_tokenizer.base import CHAT_END_TOKENS

if TYPE_CHECKING:
    from llama_tokenizer.hf import HFConfig

__all__ = ["tokenizer_from_sentencepiece"]


def tokenizer_from_sentencepiece(
    path: str | os.PathLike[str], *, config: HFConfig | None = None
) -> SentencePieceTokenizer:
    """A tokenizer from a SentencePiece model; `config` (from an HF directory) may rename the
    BOS/EOS tokens, say whether to add them, and carry the chat template.

    Without a config, BOS is added when the model defines one (as llama.cpp and HF's Llama
    tokenizer do) and EOS is not.
    """
    from llama_tokenizer.hf import HFConfig, template_tokens

    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(
            f"SentencePiece model {p} does not exist; pass the path of a .model file"
        )
    check_file_size(p, MAX_SPM_BYTES, "SentencePiece model")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except (OSError, RuntimeError) as e:
        raise WeightLoadError(
            f"{p} is not a SentencePiece model ({e}); restore the file or pass the right one"
        ) from e
    config = config or HFConfig()
    n = sp.get_piece_size()
    if not 0 < n <= MAX_VOCAB:
        raise ConfigError(
            f"{p} has {n} pieces; llama-engine accepts 1 to {MAX_VOCAB}. The file is corrupt, "
            "restore it"
        )
    names = [sp.id_to_piece(i) for i in range(n)]
    check_vocab(names, str(p), what="its vocabulary")
    pieces: list[bytes] = []
    special: list[int] = []
    for i, piece in enumerate(names):
        if sp.is_byte(i) and (b := parse_byte_token(piece)) is not None:
            pieces.append(bytes((b,)))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            pieces.append(piece.encode("utf-8"))
            special.append(i)
        else:
            pieces.append(piece.replace(SPM_SPACE, " ").encode("utf-8"))
    special_bytes = sum(len(pieces[i]) for i in special)
    if special_bytes > MAX_ADDED_TOKEN_BYTES:
        raise ConfigError(
            f"{p}: its control tokens hold {special_bytes} bytes, more than the "
            f"{MAX_ADDED_TOKEN_BYTES} llama-engine accepts; the file is corrupt, restore it"
        )

    def piece_id(piece: str | None) -> int | None:
        if piece is None:
            return None
        i = sp.piece_to_id(piece)
        return i if sp.id_to_piece(i) == piece else None

    bos_id = piece_id(config.bos_token) if config.bos_token else _opt(sp.bos_id())
    eos_id = piece_id(config.eos_token) if config.eos_token else _opt(sp.eos_id())
    probe = sp.encode("x", out_type=str)
    dummy_prefix = bool(probe) and probe[0].startswith(SPM_SPACE)
    names = {name: template_tokens(config).get(name) for name in ("bos_token", "eos_token")}
    if names["bos_token"] is None and bos_id is not None:
        names["bos_token"] = sp.id_to_piece(bos_id)
    if names["eos_token"] is None and eos_id is not None:
        names["eos_token"] = sp.id_to_piece(eos_id)
    tokens = {k: v for k, v in {**template_tokens(config), **names}.items() if v is not None}
    eog = {i for t in CHAT_END_TOKENS if (i := piece_id(t)) is not None}
    eog.update(i for i in config.eos_ids if 0 <= i < n)
    return SentencePieceTokenizer(
        sp,
        special_text={sp.id_to_piece(i): i for i in special if not sp.is_unused(i)},
        pieces=pieces,
        special=special,
        bos_id=bos_id,
        eos_id=eos_id,
        eog_ids=eog,
        add_bos=config.add_bos if config.add_bos is not None else bos_id is not None,
        add_eos=bool(config.add_eos),
        chat_template=config.chat_template,
        strip_leading_space=dummy_prefix,
        template_tokens=tokens,
        source=f"SentencePiece model {p}",
    )


def _opt(i: int) -> int | None:
    return i if i >= 0 else None
