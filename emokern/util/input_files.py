"""Checks for user-given input files (JSON data sets: scenarios, activities, coding tasks, validation prompts), with
one error type, :class:`InputFileError`, whose message names the file and the offending entry."""

from __future__ import annotations

from typing import Mapping

__all__ = ["InputFileError", "require", "require_str"]


class InputFileError(ValueError):
    """A user-supplied input file is missing, is not JSON, or does not have the documented shape."""


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
