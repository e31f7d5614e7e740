"""The experiments' input files (activities, scenarios, coding tasks): reading a packaged or user-given JSON file and
checking its documented shape, with one error type, :class:`InputFileError`, that names the file and the entry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

__all__ = ["DATA_DIR", "InputFileError", "load_input", "require", "require_str"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "experiments"  # the packaged input sets


class InputFileError(ValueError):
    """A user-supplied input file is missing, is not JSON, or does not have the documented shape."""


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


def require(cond: bool, where: str, message: str) -> None:
    """Raise :class:`InputFileError` with ``where: message`` unless ``cond``."""
    if not cond:
        raise InputFileError(f"{where}: {message}")


def require_str(obj: Mapping, key: str, where: str) -> str:
    """``obj[key]`` as a non-empty string, else :class:`InputFileError`."""
    require(isinstance(obj, Mapping), where, f"expected an object with {key!r}; got {type(obj).__name__}")
    value = obj.get(key)
    require(isinstance(value, str) and value.strip() != "", where,
            f"{key!r} must be a non-empty string; got {value!r}")
    return value
