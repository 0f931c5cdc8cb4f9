"""Tokenizers from HF files: `tokenizer.json`, and the directory around it.

`tokenizer.json` holds the pipeline (normalizer, pre-tokenizer, model, decoder, added tokens);
`tokenizer_config.json` and `special_tokens_map.json` name the BOS/EOS tokens and say whether to
add them; the chat template lives in `tokenizer_config.json` or, in newer repos, in
`chat_template.jinja`; `generation_config.json` may list more end-of-generation ids.

Decoding goes through a table of each token's bytes (see `base`), so we read how the pipeline
spells pieces from its decoder: ByteLevel (GPT-2 alphabet), Metaspace / Replace("▁") +
ByteFallback (SentencePiece), WordPiece ("##" continues a word, anything else starts one), or
plain text. WordPiece decoding here joins words with single spaces and does not apply HF's
`clean_up_tokenization_spaces` ("a , b" stays as is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers

from llama_engine.errors import ConfigError, ModelNotFoundError, WeightLoadError
from llama_tokenizer._limits import (
    MAX_ADDED_TOKEN_BYTES,
    MAX_CONFIG_BYTES,
    MAX_MERGES,
    MAX_TOKEN_BYTES,
    MAX_TOKENIZER_JSON_BYTES,
    MAX_VOCAB,
    check_file_size,
    check_vocab,
    max_id_for,
)
from llama_tokenizer._pieces import SPM_SPACE, byte_level_piece_bytes, spm_piece_bytes
from llama_tokenizer.backends import TokenizersTokenizer
from llama_tokenizer.base import CHAT_END_TOKENS, Tokenizer

__all__ = [
    "HFConfig",
    "read_hf_config",
    "template_tokens",
    "tokenizer_from_hf_dir",
    "tokenizer_from_json",
]

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(kw_only=True)
class HFConfig:
    """What the files around a tokenizer say about it; None where they say nothing."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    eos_ids: list[int] = field(default_factory=list)  # generation_config.json's eos_token_id


def _load_json(path: Path) -> Any:
    try:
        check_file_size(path, MAX_CONFIG_BYTES, "tokenizer configuration file")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"{path} does not exist; pass the path of an existing file"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the file") from e


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]  # a serialized AddedToken
    return None


def _pick_template(value: Any) -> str | None:
    """A template string, or the "default" (else first) of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def read_hf_config(
    config_path: str | os.PathLike[str] | None, *, directory: str | os.PathLike[str] | None = None
) -> HFConfig:
    """Read `tokenizer_config.json` and, when `directory` is given, the other files beside it."""
    cfg = HFConfig()
    data: Mapping[str, Any] = {}
    if config_path is not None:
        loaded = _load_json(Path(config_path))
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{config_path} should hold a JSON object; restore the file")
        data = loaded
    for name in _SPECIAL_NAMES:
        setattr(cfg, name, _token_text(data.get(name)))
    if isinstance(data.get("add_bos_token"), bool):
        cfg.add_bos = data["add_bos_token"]
    if isinstance(data.get("add_eos_token"), bool):
        cfg.add_eos = data["add_eos_token"]
    cfg.chat_template = _pick_template(data.get("chat_template"))
    if directory is None:
        return cfg
    d = Path(directory)
    if (d / "special_tokens_map.json").is_file():
        smap = _load_json(d / "special_tokens_map.json")
        if isinstance(smap, Mapping):
            for name in _SPECIAL_NAMES:
                if getattr(cfg, name) is None:
                    setattr(cfg, name, _token_text(smap.get(name)))
    if (d / "chat_template.jinja").is_file():
        check_file_size(d / "chat_template.jinja", MAX_CONFIG_BYTES, "chat template")
        try:
            cfg.chat_template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{d / 'chat_template.jinja'} cannot be read as UTF-8 text ({e}); restore the file"
            ) from e
    elif (d / "chat_template.json").is_file():
        loaded = _load_json(d / "chat_template.json")
        if isinstance(loaded, Mapping):
            cfg.chat_template = _pick_template(loaded.get("chat_template")) or cfg.chat_template
    if (d / "generation_config.json").is_file():
        gen = _load_json(d / "generation_config.json")
        eos = gen.get("eos_token_id") if isinstance(gen, Mapping) else None
        eos_list = eos if isinstance(eos, list) else [eos]
        cfg.eos_ids = [i for i in eos_list if isinstance(i, int) and not isinstance(i, bool)]
    return cfg


def _walk(decoder: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(decoder, Mapping):
        yield decoder
        for sub in decoder.get("decoders") or ():
            yield from _walk(sub)


@dataclass(frozen=True)
class _Spelling:
    kind: str  # "byte_level" | "spm" | "wordpiece" | "plain"
    strip_leading_space: bool = False
    space: str = SPM_SPACE
    prefix: str = "##"


def _spelling(spec: Mapping[str, Any]) -> _Spelling:
    """How this pipeline's vocabulary spells text, read from its decoder (and model type)."""
    steps = list(_walk(spec.get("decoder")))
    types = {s.get("type") for s in steps}
    model = spec.get("model") or {}
    if "ByteLevel" in types:
        return _Spelling("byte_level")
    if "WordPiece" in types or model.get("type") == "WordPiece":
        prefix = next((s.get("prefix") for s in steps if s.get("type") == "WordPiece"), None)
        return _Spelling(
            "wordpiece", True, prefix=prefix or model.get("continuing_subword_prefix") or "##"
        )
    for s in steps:
        if s.get("type") == "Metaspace":
            scheme = s.get("prepend_scheme")
            if scheme is None:
                scheme = "always" if s.get("add_prefix_space", True) else "never"
            return _Spelling("spm", scheme != "never", space=s.get("replacement") or SPM_SPACE)
    replaces_space = any(
        s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == SPM_SPACE
        for s in steps
    )
    if replaces_space or "ByteFallback" in types:
        strip = any(s.get("type") == "Strip" and int(s.get("start") or 0) >= 1 for s in steps)
        return _Spelling("spm", strip)
    return _Spelling("plain")


def _piece_bytes(token: str, spelling: _Spelling) -> bytes:
    if spelling.kind == "byte_level":
        return byte_level_piece_bytes(token)
    if spelling.kind == "spm":
        return spm_piece_bytes(token, space=spelling.space)
    if spelling.kind == "wordpiece":
        if token.startswith(spelling.prefix):
            return token[len(spelling.prefix) :].encode("utf-8")
        return b" " + token.encode("utf-8")
    return token.encode("utf-8")


def tokenizer_from_json(
    path: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    config: HFConfig | None = None,
) -> TokenizersTokenizer:
    """A tokenizer from `tokenizer.json` (see `Tokenizer.from_tokenizer_json`)."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(
            f"tokenizer file {p} does not exist; pass the path of a tokenizer.json"
        )
    check_file_size(p, MAX_TOKENIZER_JSON_BYTES, "tokenizer.json")
    try:
        text = p.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightLoadError(
            f"{p} is not a readable tokenizer.json ({e}); restore the file"
        ) from e
    _check_spec(spec, p)
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:
        raise WeightLoadError(
            f"{p} is not a tokenizer the `tokenizers` library can load ({e}); "
            "restore the file or upgrade `tokenizers`"
        ) from e
    if config is None:
        if config_path is None and (p.parent / "tokenizer_config.json").is_file():
            config_path = p.parent / "tokenizer_config.json"
        config = read_hf_config(config_path)

    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        raise ConfigError(f"{p} has an empty vocabulary; restore the file")
    n = max(vocab.values()) + 1
    spelling = _spelling(spec)
    added = {
        t["id"]: t for t in spec.get("added_tokens") or () if isinstance(t, Mapping) and "id" in t
    }
    pieces = [b""] * n
    special: list[int] = []
    for token, i in vocab.items():
        entry = added.get(i)
        if entry is None:
            pieces[i] = _piece_bytes(token, spelling)
            continue
        content = str(entry.get("content", token)).encode("utf-8")
        pieces[i] = b" " + content if spelling.kind == "wordpiece" else content
        if entry.get("special"):
            special.append(i)

    def token_id(name: str | None) -> int | None:
        return backend.token_to_id(name) if name is not None else None

    bos_id, eos_id = token_id(config.bos_token), token_id(config.eos_token)
    use_post_processor = (
        spec.get("post_processor") is not None and config.add_bos is None and config.add_eos is None
    )
    if use_post_processor:
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id]
        add_eos = eos_id is not None and with_special[-1:] == [eos_id] and plain[-1:] != [eos_id]
    else:
        add_bos, add_eos = bool(config.add_bos), bool(config.add_eos)
    eog = {i for t in CHAT_END_TOKENS if (i := backend.token_to_id(t)) is not None}
    eog.update(i for i in config.eos_ids if 0 <= i < n)
    return TokenizersTokenizer(
        backend,
        use_post_processor=use_post_processor,
        pieces=pieces,
        special=special,
        bos_id=bos_id,
        eos_id=eos_id,
        eog_ids=eog,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=config.chat_template,
        strip_leading_space=spelling.strip_leading_space,
        template_tokens=template_tokens(config),
        source=f"tokenizer {p}",
    )


def _bad_id(value: Any) -> bool:
    return type(value) is not int or not 0 <= value < MAX_VOCAB


def _check_spec(spec: Any, p: Path) -> None:
    """Bounds on a parsed tokenizer.json (see `_limits`), before `tokenizers` builds from it:
    vocabulary size and token lengths, merges, added tokens, and ids that are integers below
    MAX_VOCAB and not far past the number of tokens (one id of 10**8 would size a table)."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{p}: {what}; the file is corrupt, restore it")

    if not isinstance(spec, Mapping):
        raise WeightLoadError(
            f"{p} holds a JSON {type(spec).__name__}, not a tokenizer object; restore the file"
        )
    model = spec.get("model")
    if not isinstance(model, Mapping):
        raise WeightLoadError(f"{p} has no \"model\" object; restore the file")
    vocab = model.get("vocab")
    ids: set[int] = set()
    if isinstance(vocab, Mapping):  # BPE, WordPiece, WordLevel: {token: id}
        tokens: list[Any] = list(vocab)
        for t, i in vocab.items():
            if _bad_id(i):
                raise bad(f"model.vocab gives the token {t[:80]!r} the id {str(i)[:80]}, not an "
                          f"integer in [0, {MAX_VOCAB})")
        ids.update(vocab.values())
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        tokens = [e[0] if isinstance(e, list) and e else e for e in vocab]
        ids.update(range(len(vocab)))
    elif vocab is None:
        tokens = []
    else:
        raise bad(f"model.vocab is a {type(vocab).__name__}, not an object or a list")
    check_vocab(tokens, str(p), what="model.vocab")
    merges = model.get("merges")
    if merges is not None and not isinstance(merges, list):
        raise bad(f"model.merges is a {type(merges).__name__}, not a list")
    if merges is not None and len(merges) > MAX_MERGES:
        raise bad(f"model.merges has {len(merges)} entries, more than the {MAX_MERGES} accepted")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list):
        raise bad(f"added_tokens is a {type(added).__name__}, not a list")
    if len(added) > MAX_VOCAB:
        raise bad(f"added_tokens has {len(added)} entries, more than the {MAX_VOCAB} accepted")
    added_bytes = 0
    for t in added:
        if not isinstance(t, Mapping) or not isinstance(t.get("content"), str):
            raise bad(f"added_tokens holds {str(t)[:80]}, not a token with a string content")
        if _bad_id(t.get("id")):
            raise bad(f"the added token {t['content'][:80]!r} has the id {str(t.get('id'))[:80]}, "
                      f"not an integer in [0, {MAX_VOCAB})")
        n = len(t["content"].encode("utf-8", "replace"))
        if n > MAX_TOKEN_BYTES:
            raise bad(f"the added token with id {t['id']} is {n} bytes long, more than the "
                      f"{MAX_TOKEN_BYTES} accepted")
        added_bytes += n
        ids.add(t["id"])
    if added_bytes > MAX_ADDED_TOKEN_BYTES:
        raise bad(f"added_tokens hold {added_bytes} bytes, more than the "
                  f"{MAX_ADDED_TOKEN_BYTES} accepted")
    if ids and max(ids) > max_id_for(len(ids)):
        raise bad(f"the token id {max(ids)} is far beyond the {len(ids)} tokens the file "
                  f"defines (ids up to {max_id_for(len(ids))} are accepted)")


def tokenizer_from_hf_dir(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from an HF model directory (see `Tokenizer.from_hf_dir`)."""
    d = Path(path)
    if not d.is_dir():
        raise ModelNotFoundError(
            f"model directory {d} does not exist; pass the path of an HF model directory"
        )
    config_path = d / "tokenizer_config.json"
    config = read_hf_config(config_path if config_path.is_file() else None, directory=d)
    if (d / "tokenizer.json").is_file():
        return tokenizer_from_json(d / "tokenizer.json", config=config)
    if (d / "tokenizer.model").is_file():
        from llama_tokenizer.spm import tokenizer_from_sentencepiece

        return tokenizer_from_sentencepiece(d / "tokenizer.model", config=config)
    raise ModelNotFoundError(
        f"{d} has neither tokenizer.json nor tokenizer.model; pass the directory of a model "
        "that ships its tokenizer, or the GGUF file it was converted to"
    )


def template_tokens(config: HFConfig) -> dict[str, str]:
    """The special-token strings a chat template sees (bos_token, eos_token, ...)."""
    return {n: v for n in _SPECIAL_NAMES if (v := getattr(config, n)) is not None}
