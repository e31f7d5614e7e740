"""Atomic file writes: a reader, or a run resumed after a kill, sees the old file (or none) or the whole new one,
never half of it.

Every writer goes through :func:`atomic_path`: the new content is written to a temporary file in the target's own
folder (so the final ``os.replace`` is a rename within one file system, which POSIX makes atomic), flushed to disk,
then renamed over the target. On any error the temporary file is removed and the target is left as it was.
Temporary names are ``.{name}.tmp-{random}``, hidden and recognisable, so a folder's leftovers from a kill can be
found with the glob ``.*.tmp-*``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Union

__all__ = ["TMP_GLOB", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "temporary_leftovers"]

TMP_GLOB = ".*.tmp-*"  # what a killed writer can leave behind in the target's folder


def temporary_leftovers(folder: Union[str, os.PathLike], name: Optional[str] = None) -> List[Path]:
    """The temporary files that killed writers left in ``folder`` (sorted): all of them (:data:`TMP_GLOB`), or with
    ``name`` only those of the target ``folder / name``. A caller that owns the folder deletes them before writing
    again; nothing else ever reads them."""
    pattern = TMP_GLOB if name is None else f".{glob.escape(name)}.tmp-*"
    return sorted(Path(folder).glob(pattern))


def _new_temporary(path: Path) -> Path:
    """Create an empty ``.{name}.tmp-{random}`` beside ``path`` and return it. Created with mode 0o666 less the
    umask, as ``open(path, "w")`` would create ``path`` itself (``tempfile.mkstemp`` makes 0o600, which the rename
    would hand on to the target)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name} after 100 tries")


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (its folder is created); when the block ends without an error,
    fsync that file and rename it to ``path``; on an error, delete it and re-raise. For writers that want a path of
    their own (``safetensors.torch.save_file``, ``gguf.GGUFWriter``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer may have closed and reopened it: flush what reached the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, os.PathLike], obj: Any, *, indent: Optional[int] = 1,
                      default: Optional[Callable[[Any], Any]] = None) -> Path:
    """Write ``obj`` as JSON (``indent``; NaN and infinity refused, as strict JSON readers do) to ``path``
    atomically. ``default`` converts objects ``json`` cannot (as in :func:`json.dumps`); returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False, default=default))
