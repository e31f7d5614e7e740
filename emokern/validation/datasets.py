"""Loaders for the external evaluation data shipped under ``emokern/data/`` (used by :mod:`emokern.validation.report`).

* :func:`load_goemotions` — the GoEmotions test split (Reddit comments, 27 emotion labels + neutral, Apache-2.0),
  ``data/goemotions/test.tsv`` and ``emotions.txt``.
* :func:`load_emobank` — EmoBank sentences with valence/arousal/dominance ratings (CC BY-SA 4.0),
  ``data/emobank/emobank.csv``.

The human valence/arousal norms of the emotion words, which extraction uses too, are
:func:`emokern.core.emotions.load_norms`. Each subfolder's README.md gives the source, the licence and the
attribution. Every loader takes ``data_dir``: the folder that holds ``goemotions/`` and ``emobank/`` (default: the
package's own ``emokern/data``), so a fuller copy of a data set can be used in place of the shipped one. A missing
file raises :class:`emokern.util.data_files.DataFileMissingError` naming the path.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from emokern.util.data_files import data_file

__all__ = ["EmoBankSentence", "GoEmotionsText", "load_emobank", "load_goemotions"]

PathLike = Union[str, os.PathLike]

EMOBANK_SPLITS = ("train", "dev", "test")
# Only the test split of GoEmotions is shipped (see data/goemotions/README.md).
GOEMOTIONS_SPLITS = ("test",)


@dataclass(frozen=True)
class GoEmotionsText:
    """One GoEmotions comment: its ``text``, its label names (one or more of the 28, ``neutral`` included), its id."""

    text: str
    labels: Tuple[str, ...]
    id: str


@dataclass(frozen=True)
class EmoBankSentence:
    """One EmoBank sentence with its ratings (1–5): ``valence`` (V), ``arousal`` (A), ``dominance`` (D)."""

    id: str
    split: str
    valence: float
    arousal: float
    dominance: float
    text: str


def load_goemotions(split: str = "test", *, data_dir: Optional[PathLike] = None) -> List[GoEmotionsText]:
    """The GoEmotions comments of ``split`` (only ``"test"`` is shipped: 5,427 comments), in file order.

    Label ids are turned into names through ``emotions.txt``. The text is unescaped by the ``csv`` module (the file
    CSV-quotes fields that contain quotes).
    """
    if split not in GOEMOTIONS_SPLITS:
        raise ValueError(f"split: expected one of {GOEMOTIONS_SPLITS} (the splits shipped with emokern); got {split!r}")
    names_path = data_file(data_dir, "goemotions", "emotions.txt")
    path = data_file(data_dir, "goemotions", f"{split}.tsv")
    label_names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            text, ids, comment_id = row
            out.append(GoEmotionsText(text=text, labels=tuple(label_names[int(i)] for i in ids.split(",")),
                                      id=comment_id))
    return out


def load_emobank(split: Optional[str] = "test", *, data_dir: Optional[PathLike] = None) -> List[EmoBankSentence]:
    """The EmoBank sentences of ``split`` (``"train"``, ``"dev"``, ``"test"``; ``None`` for all 10,062), file order."""
    if split is not None and split not in EMOBANK_SPLITS:
        raise ValueError(f"split: expected one of {EMOBANK_SPLITS} or None (all sentences); got {split!r}")
    path = data_file(data_dir, "emobank", "emobank.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [EmoBankSentence(id=r["id"], split=r["split"], valence=float(r["V"]), arousal=float(r["A"]),
                            dominance=float(r["D"]), text=r["text"])
            for r in rows if split is None or r["split"] == split]
