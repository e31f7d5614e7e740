"""The experiments' input files (activities, scenarios, coding tasks): reading a packaged or user-given JSON file and
checking its documented shape with the checks of :mod:`emokern.util.input_files`, whose :class:`InputFileError`
names the file and the entry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Union

from emokern.util.input_files import InputFileError

__all__ = ["DATA_DIR", "load_input"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "experiments"  # the packaged input sets


def load_input(path: Union[None, str, os.PathLike], default: str, validate: Callable[[Any, str], Any]) -> Any:
    """Read an experiment's input set: ``path`` if given, else the packaged ``emokern/data/experiments/<default>``.

    ``validate(data, where)`` checks the documented shape and returns the parsed value; it raises
    :class:`InputFileError` naming ``where`` (the file) and the offending entry.
    """
    where = str(path) if path is not None else f"<packaged {default}>"
    file = Path(path) if path is not None else DATA_DIR / default
    if not file.is_file():
        raise InputFileError(f"input file {where!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"input file {where!r} is not valid JSON: {exc}") from None
    return validate(data, where)
