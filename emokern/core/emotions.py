"""The 171 emotion words of Sofroniew et al. (2026), shipped as ``emokern/data/emotions_171.txt``.

``EMOTIONS`` is the same words as a tuple, read from the file on first access.

See ``emokern/data/README.md`` for the source and attribution.
"""

from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["EMOTIONS", "N_EMOTIONS", "load_emotions"]

N_EMOTIONS = 171
_FILE = "emotions_171.txt"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[str, ...]:
    text = files("emokern").joinpath("data", _FILE).read_text(encoding="utf-8")
    words = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(words) != N_EMOTIONS:
        raise RuntimeError(f"emokern/data/{_FILE}: expected {N_EMOTIONS} emotion words, got {len(words)}")
    if len(set(words)) != len(words):
        dupes = sorted({w for w in words if words.count(w) > 1})
        raise RuntimeError(f"emokern/data/{_FILE}: expected unique emotion words, got duplicates {dupes}")
    return words


def load_emotions() -> list[str]:
    """The 171 emotion words/phrases in file order (alphabetical), stripped of surrounding whitespace.

    Returns a new list each call, so callers may modify it. Raises ``RuntimeError`` if the shipped file does not
    hold exactly 171 unique non-blank lines.
    """
    return list(_load())


def __getattr__(name: str):
    # EMOTIONS is read on first access (PEP 562), so importing this module costs no file I/O. It is a tuple (one
    # shared, immutable object); load_emotions() gives a fresh list.
    if name == "EMOTIONS":
        return _load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

