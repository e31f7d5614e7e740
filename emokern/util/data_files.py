"""The data files emokern ships under ``emokern/data/`` (or a user's fuller copy of that folder), found by their path
inside it, with one error for a missing file that says where it was looked for and where the data comes from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["DataFileMissingError", "data_file"]


class DataFileMissingError(FileNotFoundError):
    """A data file that a loader needs does not exist under the data directory."""


def data_file(data_dir: Optional[Union[str, os.PathLike]], *parts: str) -> Path:
    """The file ``data_dir / parts[0] / ...`` (``data_dir=None``: the package's own ``emokern/data``);
    :class:`DataFileMissingError` naming the path, the data directory and the subfolder's README (which says where
    the data comes from) when it is not a file."""
    if data_dir is None:
        from importlib.resources import files

        root = Path(str(files("emokern").joinpath("data")))
    else:
        root = Path(data_dir)
    path = root.joinpath(*parts)
    if not path.is_file():
        raise DataFileMissingError(
            f"data file {path} does not exist; emokern expects {'/'.join(parts)} under the data directory "
            f"{root} (see emokern/data/{parts[0]}/README.md for where it comes from)"
        )
    return path
