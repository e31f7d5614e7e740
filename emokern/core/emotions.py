"""The 171 emotion words of Sofroniew et al. (2026), shipped as ``emokern/data/emotions_171.txt``, and the human
valence/arousal ratings of 108 of them (:func:`load_norms`: a Glasgow Norms subset, CC BY 4.0,
``emokern/data/norms/emotion_word_norms.tsv``), which extraction (the valence AUROC) and the report both use.

``EMOTIONS`` is the same words as a tuple, read from the file on first access.

See ``emokern/data/README.md`` for the source and attribution.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from importlib.resources import files
from typing import List, Optional, Union

from emokern.util.data_files import data_file

__all__ = ["EMOTIONS", "N_EMOTIONS", "EmotionNorm", "load_emotions", "load_norms"]

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


@dataclass(frozen=True)
class EmotionNorm:
    """Human ratings of one emotion word (Glasgow Norms; both scales 1–9).

    ``valence``: 1 = unhappy/negative .. 9 = happy/positive. ``arousal``: 1 = calm .. 9 = excited. ``entry``: the
    Glasgow headword whose ratings were used; ``match``: how ``word`` was matched to it (``exact``, ``sense``,
    ``lemma`` or ``derived``; a strict analysis drops ``derived``).
    """

    word: str
    valence: float
    arousal: float
    entry: str
    match: str


def load_norms(*, data_dir: Optional[Union[str, os.PathLike]] = None) -> List[EmotionNorm]:
    """The human valence/arousal norms, one :class:`EmotionNorm` per rated word, in file (paper) order.

    108 of the 171 emotion words are rated; the others are absent. ``data_dir``: the folder holding ``norms/``
    (default: the package's ``emokern/data``); a missing file raises
    :class:`emokern.util.data_files.DataFileMissingError`.
    """
    path = data_file(data_dir, "norms", "emotion_word_norms.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [EmotionNorm(word=r["word"], valence=float(r["valence"]), arousal=float(r["arousal"]), entry=r["entry"],
                        match=r["match"]) for r in rows]
