"""'Did you mean' suggestions for error messages about unknown names."""

from __future__ import annotations

import difflib
from typing import Iterable, List

__all__ = ["close_names", "did_you_mean"]


def close_names(name: str, names: Iterable[str], *, n: int = 5, cutoff: float = 0.6) -> List[str]:
    """Up to ``n`` of ``names`` that look like ``name`` (difflib's ratio ≥ ``cutoff``), best first."""
    return difflib.get_close_matches(str(name), [str(x) for x in names], n=n, cutoff=cutoff)


def did_you_mean(name: str, names: Iterable[str], *, n: int = 5, cutoff: float = 0.6) -> str:
    """``"; did you mean 'a', 'b'?"`` with the close names of :func:`close_names`, or ``""`` when there are none:
    the tail of an error message that names the unknown ``name``."""
    close = close_names(name, names, n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
