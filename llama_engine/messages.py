"""OpenAI-style chat messages: checked once, at the edge, for every surface (chat templates,
tool prompts, adapters).

A `content` given as a list of parts (`[{"type": "text", "text": ...}, ...]`) becomes one string,
the text parts separated by "\n" as llama.cpp's server and vLLM do for text-only models; any
other part type (images, audio) is refused with a typed error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_engine.errors import InvalidParamsError

__all__ = ["check_messages"]


def check_messages(messages: object) -> list[Mapping[str, Any]]:
    """`messages` checked (a list of dicts with a string 'role'), with list-of-parts contents
    joined into strings."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidParamsError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}; for a raw prompt call generate() instead"
        )
    checked: list[Mapping[str, Any]] = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidParamsError(
                f"message {n} must be a dict with a string 'role', got {_clip(repr(m))}; "
                "write messages as {'role': 'user', 'content': '...'}"
            )
        content = m.get("content")
        if isinstance(content, list | tuple):
            m = {**m, "content": _join_text_parts(n, content)}
        checked.append(m)
    return checked


def _join_text_parts(n: int, parts: Sequence[Any]) -> str:
    """The text of OpenAI-style content parts, joined with "\n" (llama.cpp server, vLLM)."""
    texts: list[str] = []
    for i, part in enumerate(parts):
        where = f"message {n} content part {i}"
        if not isinstance(part, Mapping):
            raise InvalidParamsError(
                f"{where} must be a dict like {{'type': 'text', 'text': '...'}}, got "
                f"{type(part).__name__}; write content as a string or a list of text parts"
            )
        kind = part.get("type")
        if kind != "text":
            raise InvalidParamsError(
                f"{where} has type {_clip(repr(kind), 40)}; only 'text' parts are supported "
                "(this engine runs text-only models): drop the part or describe it in text"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidParamsError(
                f"{where} is a 'text' part whose 'text' is {type(text).__name__}, not a string; "
                "write it as {'type': 'text', 'text': '...'}"
            )
        texts.append(text)
    return "\n".join(texts)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
