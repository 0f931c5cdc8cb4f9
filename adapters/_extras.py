"""The error an adapter raises when its framework is not installed."""

from __future__ import annotations

__all__ = ["missing_extra"]


def missing_extra(adapter: str, extra: str, error: ImportError) -> ImportError:
    """An ImportError naming the missing package and the extra that installs it."""
    return ImportError(
        f"{adapter} needs {error.name or 'a package'!s}, which is not installed; install the "
        f"adapter's extra: pip install 'llama-engine[{extra}]'")
