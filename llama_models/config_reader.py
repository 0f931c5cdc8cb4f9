"""Typed, bounded reads of one model's configuration, from GGUF metadata or an HF config.json.

Every architecture reads its numbers through one `ConfigReader`, so every value is checked the
same way (an int in range, a finite float, a bool) and every failure is a `ConfigError` naming
the key and the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_engine.errors import ConfigError
from llama_models.checkpoint import check_float, check_int

__all__ = ["MISSING", "ConfigReader"]

MISSING: Any = object()
"""The default of a key that must be present."""


class ConfigReader:
    """Values of one configuration: GGUF metadata, whose keys are read under the architecture's
    prefix (`reader.int("block_count", ...)` reads `llama.block_count`), or an HF config dict
    (`prefix` empty). A key whose value is None counts as absent."""

    def __init__(self, values: Mapping[str, Any], source: str, *, prefix: str = "") -> None:
        self.values, self.source, self.prefix = values, source, prefix

    @classmethod
    def gguf(cls, meta: Mapping[str, Any], source: str) -> ConfigReader:
        return cls(meta, source, prefix=f"{meta['general.architecture']}.")

    @property
    def is_gguf(self) -> bool:
        return bool(self.prefix)

    def key(self, key: str) -> str:
        return self.prefix + key

    def has(self, key: str) -> bool:
        return self.values.get(self.key(key)) is not None

    def get(self, key: str, default: Any = MISSING) -> Any:
        value = self.values.get(self.key(key))
        if value is not None:
            return value
        if default is MISSING:
            raise ConfigError(f"{self.source} lacks the key {self.key(key)!r}; the file is "
                              "incomplete, restore it")
        return default

    def int(self, key: str, hi: int, default: Any = MISSING, *, lo: int = 1) -> int:
        return check_int(self.get(key, default), self.key(key), self.source, lo=lo, hi=hi)

    def float(self, key: str, default: Any = MISSING, *, lo: float = 0.0,
              hi: float = float("inf")) -> float:
        return check_float(self.get(key, default), self.key(key), self.source, lo=lo, hi=hi)

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {self.key(key)} should be true or false, got "
                              f"{value!r}; restore the file")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        """An object value (an absent one is empty)."""
        value = self.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.source}: {self.key(key)} should be an object, got "
                              f"{value!r}; restore the file")
        return dict(value)
