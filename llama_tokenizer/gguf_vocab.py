"""Building a tokenizer from the vocabulary a GGUF file embeds, the way llama.cpp reads it.

A GGUF has no `tokenizer.json`. It stores, under `tokenizer.ggml.*`:

- `model`: "gpt2" (byte-level BPE with `merges`) or "llama" (SentencePiece-style pieces with
  `scores` and byte tokens "<0xXX>", usually without merges);
- `tokens`, `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
- `pre`: the name of llama.cpp's pre-tokenizer, i.e. the regexes that split text into words
  before BPE (`PRE_TOKENIZER_SPLITS`);
- the special ids (`bos_token_id`, `eos_token_id`, `eot_token_id`, ...), `add_bos_token`,
  `add_eos_token`, `add_space_prefix`, and `tokenizer.chat_template`.

We rebuild an equivalent `tokenizers.Tokenizer`: control tokens become special added tokens,
user-defined tokens plain added tokens (both matched whole in the raw text, as llama.cpp does).
For "llama" vocabularies the BPE merges are derived from the vocabulary: every split of a normal
token into two tokens is a merge, ranked by the merged token's score, except for Gemma, whose
scores do not follow its merge order but whose vocabulary order does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llama_engine.errors import ConfigError, UnsupportedArchitectureError, WeightLoadError
from llama_tokenizer._limits import (
    MAX_ADDED_TOKEN_BYTES,
    MAX_MERGES,
    MAX_TOKEN_BYTES,
    check_vocab,
)
from llama_tokenizer._pieces import (
    SPM_SPACE,
    byte_level_piece_bytes,
    bytes_to_unicode,
    parse_byte_token,
)
from llama_tokenizer.backends import TokenizersTokenizer
from llama_tokenizer.base import CHAT_END_TOKENS

__all__ = ["PRE_TOKENIZER_SPLITS", "tokenizer_from_gguf_metadata"]

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Merges derived from a "llama" vocabulary: Gemma 3 gets 2 per token, holding 2.1 times the
# vocabulary's characters; a vocabulary of ever-longer runs of one letter would get n**2 / 2.
_DERIVED_MERGES_PER_TOKEN = 8
_DERIVED_MERGE_CHARS_PER_CHAR = 8
_SPECIAL_TYPES = (UNKNOWN, CONTROL, UNUSED)

# -- pre-tokenizers: llama.cpp's regex lists (src/llama-vocab.cpp), applied one after another --
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT = r"\p{N}"
_WORDS_PUNCT = r" ?[^(\s|.,!?…。，、।۔،)]+"


def _names(names: str, splits: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names.split(), splits)


PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, for files that name no pre-tokenizer
    **_names("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    **_names(
        "gpt2 gpt-2 phi-2 mpt olmo jais trillion granite-docling jina-es jina-de gigachat "
        "jina-v1-en jina-v2-es jina-v2-de jina-v2-code a.x-4.0 mellum exaone4 roberta-bpe "
        "modern-bert",
        (_GPT2,),
    ),
    **_names("smollm starcoder refact command-r codeshell exaone minerva-7b", (_DIGIT, _GPT2)),
    **_names(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe "
        "chatglm-bpe glm4",
        (_LLAMA3,),
    ),
    **_names("qwen2 deepseek-r1-qwen megrez stablelm2 hunyuan kormo", (_QWEN2,)),
    **_names("gpt-4o llama4 minimax-m2", (_GPT4O,)),
    **_names("tekken", (_TEKKEN,)),
    **_names("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    **_names("poro-chat bloom gpt3-finnish", (_WORDS_PUNCT,)),
    **_names("viking", (_WORDS_PUNCT, _DIGIT)),
    **_names(
        "deepseek-coder",
        ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", _DIGIT),
    ),
}
# llama.cpp looks a whole word up in the vocabulary before merging for these.
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0")
_IGNORE_MERGES = frozenset((*_LLAMA3_NAMES, "lfm2", "tekken"))
# ... and adds BOS by default (the file's add_bos_token still wins).
_ADD_BOS_DEFAULT = frozenset((*_IGNORE_MERGES, "chameleon"))


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    splits = PRE_TOKENIZER_SPLITS.get(name)
    if splits is None:
        logger.warning(
            "GGUF pre-tokenizer %r is not known here; splitting text with the GPT-2 regex, "
            "which may give different ids than llama.cpp for this model",
            name,
        )
        splits = (_GPT2,)
    steps: list[pre_tokenizers.PreTokenizer] = []
    for n, pattern in enumerate(splits):
        if pattern == _DIGIT:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif pattern == _GPT2 and n == len(splits) - 1:
            break  # ByteLevel's own regex is GPT-2's
        else:
            steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    use_regex = splits[-1] == _GPT2
    steps.append(
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)
    )
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# -- metadata access ----------------------------------------------------------------------------
def _get_list(meta: Mapping[str, Any], key: str, n: int | None = None) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
        raise ConfigError(
            f"GGUF metadata {key} should be an array, got {type(value).__name__}; "
            "the file's tokenizer data is corrupt, re-convert the model"
        )
    if n is not None and len(value) != n:
        raise ConfigError(
            f"GGUF metadata {key} has {len(value)} entries but tokenizer.ggml.tokens has {n}; "
            "the file's tokenizer data is corrupt, re-convert the model"
        )
    return list(value)


def _get_id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        i = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"GGUF metadata {key} should be a token id, got {value!r}; re-convert the model"
        ) from None
    if i < 0 or i == 0xFFFFFFFF:  # llama.cpp's "no such token"
        return None
    if i >= n:
        raise ConfigError(
            f"GGUF metadata {key} = {i} is outside the vocabulary [0, {n}); "
            "the file's tokenizer data is corrupt, re-convert the model"
        )
    return i


def _get_bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    return default if value is None else bool(value)


# -- builders -----------------------------------------------------------------------------------
def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> TokenizersTokenizer:
    """The tokenizer described by a GGUF's metadata (see the module docstring)."""
    if not isinstance(meta, Mapping):
        raise ConfigError(
            f"GGUF metadata must be a mapping of key to value, got {type(meta).__name__}; "
            "pass {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}"
        )
    start = time.perf_counter()
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ConfigError(
            "GGUF metadata has no tokenizer.ggml.model, so the file embeds no tokenizer; "
            "load one from the original model's directory with Tokenizer.from_hf_dir()"
        )
    if kind not in ("gpt2", "llama"):
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece-style); load the tokenizer from the model's HF directory "
            "with Tokenizer.from_hf_dir() instead"
        )
    tokens = _get_list(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(
            "GGUF metadata has no tokenizer.ggml.tokens (the vocabulary); "
            "the file is incomplete, re-convert the model"
        )
    if not all(isinstance(t, str) for t in tokens):
        raise ConfigError(
            "GGUF metadata tokenizer.ggml.tokens holds non-string entries; "
            "the file's tokenizer data is corrupt, re-convert the model"
        )
    check_vocab(tokens, "GGUF metadata", what="tokenizer.ggml.tokens")
    n = len(tokens)
    types = _get_list(meta, "tokenizer.ggml.token_type", n) or [NORMAL] * n
    try:
        types = [int(t) for t in types]
    except (TypeError, ValueError, OverflowError):
        raise _corrupt("tokenizer.ggml.token_type", "non-integer") from None
    arch = str(meta.get("general.architecture", ""))
    if kind == "gpt2":
        tok = _build_byte_level(meta, tokens, types)
    else:
        tok = _build_sentencepiece(meta, tokens, types, arch)
    logger.debug(
        "built the %s tokenizer of a %s GGUF (%d tokens) in %.2f s",
        kind,
        arch or "?",
        n,
        time.perf_counter() - start,
    )
    return tok


def _common(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], *, add_bos_default: bool
) -> dict[str, Any]:
    """Constructor arguments shared by both vocabulary kinds."""
    n = len(tokens)
    ids = {
        name: _get_id(meta, f"tokenizer.ggml.{name}_token_id", n)
        for name in ("bos", "eos", "eot", "eom", "unknown", "padding")
    }
    eog = {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
    wanted = set(CHAT_END_TOKENS)
    eog |= {
        i
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (CONTROL, USER_DEFINED) and t in wanted
    }
    template_tokens = {
        var: tokens[ids[key]]
        for var, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
        if ids[key] is not None
    }
    template = meta.get("tokenizer.chat_template")
    name = meta.get("general.name") or meta.get("general.architecture") or "model"
    return {
        "special": [i for i, ty in enumerate(types) if ty in _SPECIAL_TYPES],
        "bos_id": ids["bos"],
        "eos_id": ids["eos"],
        "eog_ids": eog,
        "add_bos": _get_bool(meta, "tokenizer.ggml.add_bos_token", add_bos_default),
        "add_eos": _get_bool(meta, "tokenizer.ggml.add_eos_token", False),
        "chat_template": template if isinstance(template, str) else None,
        "template_tokens": template_tokens,
        "source": f"GGUF vocabulary of {name!r}",
    }


def _add_tokens(
    backend: HFTokenizer, tokens: list[str], types: list[int], *, skip: Iterable[int] = ()
) -> None:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens."""
    skipped = set(skip)
    added = sum(
        len(t.encode("utf-8", "replace"))
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (CONTROL, UNKNOWN, USER_DEFINED) and i not in skipped
    )
    if added > MAX_ADDED_TOKEN_BYTES:
        raise ConfigError(
            f"the GGUF vocabulary's control and user-defined tokens hold {added} bytes, more "
            f"than the {MAX_ADDED_TOKEN_BYTES} llama-engine accepts; the file's tokenizer data "
            "is corrupt, re-convert the model"
        )
    special = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (CONTROL, UNKNOWN) and t and i not in skipped
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if ty == USER_DEFINED and t and i not in skipped
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > len(tokens):
        raise WeightLoadError(
            f"the GGUF vocabulary has {len(tokens)} tokens but its special tokens made the "
            f"tokenizer grow to {size}; the file's tokenizer data is inconsistent, "
            "re-convert the model"
        )


def _build_byte_level(
    meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> TokenizersTokenizer:
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    pieces: list[bytes] = []
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty == NORMAL:
            key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            pieces.append(byte_level_piece_bytes(t))
        elif ty == BYTE and (b := parse_byte_token(t)) is not None:
            key = t
            pieces.append(bytes((b,)))
        else:  # control, user-defined, unknown, unused: written as plain text
            key = t
            pieces.append(t.encode("utf-8"))
        vocab.setdefault(key, i)
    raw_merges = _get_list(meta, "tokenizer.ggml.merges")
    if not raw_merges:
        raise ConfigError(
            "GGUF metadata has a gpt2 (BPE) vocabulary but no tokenizer.ggml.merges; "
            "the file is incomplete, re-convert the model"
        )
    if len(raw_merges) > MAX_MERGES:
        raise ConfigError(
            f"GGUF metadata tokenizer.ggml.merges has {len(raw_merges)} entries, more than the "
            f"{MAX_MERGES} llama-engine accepts; the file's tokenizer data is corrupt, "
            "re-convert the model"
        )
    merges: list[tuple[str, str]] = []
    for m in raw_merges:
        ok = isinstance(m, str) and len(m) <= 2 * MAX_TOKEN_BYTES + 1
        left, sep, right = m.partition(" ") if ok else ("", "", "")
        if not sep or not left or not right:
            raise ConfigError(
                f"GGUF metadata tokenizer.ggml.merges holds {m!r}, not 'left right'; "
                "the file's tokenizer data is corrupt, re-convert the model"
            )
        merges.append((left, right))
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as e:
        raise WeightLoadError(
            f"the GGUF BPE vocabulary and merges do not fit together ({e}); "
            "the file's tokenizer data is corrupt, re-convert the model"
        ) from e
    backend = HFTokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, tokens, types)
    kwargs = _common(meta, tokens, types, add_bos_default=pre in _ADD_BOS_DEFAULT)
    return TokenizersTokenizer(backend, pieces=pieces, **kwargs)


def _derive_merges(
    keys: Sequence[str],
    vocab: Mapping[str, int],
    order: Iterable[int],
    *,
    max_merges: int,
    max_chars: int,
) -> list[tuple[str, str]]:
    """Every split of each token in `order` into two vocabulary tokens, longer left part first.
    Refused once there are more than `max_merges`, or they hold more than `max_chars`."""
    merges: list[tuple[str, str]] = []
    append = merges.append
    chars = 0
    for i in order:
        t = keys[i]
        before = len(merges)
        for k in range(len(t) - 1, 0, -1):
            left = t[:k]
            if left in vocab:
                right = t[k:]
                if right in vocab:
                    append((left, right))
        chars += (len(merges) - before) * len(t)
        if len(merges) > max_merges or chars > max_chars:
            raise ConfigError(
                f"the GGUF vocabulary of {len(keys)} tokens splits into more than "
                f"{len(merges)} BPE merges holding {chars} characters (at most {max_merges} and "
                f"{max_chars} are accepted); the file's tokenizer data is corrupt or "
                "adversarial, re-convert the model"
            )
    return merges


def _build_sentencepiece(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], arch: str
) -> TokenizersTokenizer:
    n = len(tokens)
    gemma = arch.startswith("gemma")
    scores = _get_list(meta, "tokenizer.ggml.scores", n)
    add_prefix = _get_bool(meta, "tokenizer.ggml.add_space_prefix", not gemma)
    keys = list(tokens)
    respelled: list[int] = []
    if gemma:
        # Gemma stores its runs of spaces as real spaces, but text reaches the model with
        # spaces already turned into "▁", so those tokens must be looked up as "▁" runs.
        for i, t in enumerate(tokens):
            if t and not t.strip(" "):
                keys[i] = SPM_SPACE * len(t)
                respelled.append(i)
    vocab: dict[str, int] = {}
    for i, k in enumerate(keys):
        vocab.setdefault(k, i)
    mergeable = set(respelled)
    candidates = [
        i
        for i, ty in enumerate(types)
        if (ty == NORMAL or i in mergeable) and len(keys[i]) > 1 and vocab[keys[i]] == i
    ]
    if not gemma and scores is not None:
        try:
            rank = [float(x) for x in scores]
        except (TypeError, ValueError, OverflowError):
            raise _corrupt("tokenizer.ggml.scores", "non-numeric") from None
        candidates.sort(key=lambda i: (-rank[i], i))
    merges = _derive_merges(
        keys,
        vocab,
        candidates,
        max_merges=_DERIVED_MERGES_PER_TOKEN * n + (1 << 16),
        max_chars=_DERIVED_MERGE_CHARS_PER_CHAR * sum(map(len, keys)) + (1 << 20),
    )
    unk_id = _get_id(meta, "tokenizer.ggml.unknown_token_id", n)
    try:
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=keys[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:
        raise WeightLoadError(
            f"could not build a BPE model from the GGUF SentencePiece vocabulary ({e}); "
            "the file's tokenizer data is corrupt, re-convert the model"
        ) from e
    backend = HFTokenizer(model)
    replace = normalizers.Replace(" ", SPM_SPACE)
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPM_SPACE), replace]) if add_prefix else replace
    )
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    _add_tokens(backend, tokens, types, skip=respelled)
    pieces: list[bytes] = []
    for t, ty in zip(tokens, types, strict=True):
        if ty == NORMAL:
            pieces.append(t.replace(SPM_SPACE, " ").encode("utf-8"))
        elif ty == BYTE and (b := parse_byte_token(t)) is not None:
            pieces.append(bytes((b,)))
        else:  # control, user-defined, unknown, unused: written as plain text
            pieces.append(t.encode("utf-8"))
    kwargs = _common(meta, tokens, types, add_bos_default=True)
    return TokenizersTokenizer(backend, pieces=pieces, strip_leading_space=add_prefix, **kwargs)


def _corrupt(key: str, kind: str) -> ConfigError:
    return ConfigError(f"GGUF metadata {key} holds {kind} entries; the file's tokenizer data is "
                       "corrupt, re-convert the model")
