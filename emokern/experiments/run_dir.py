"""An experiment's output folder and its resumable units: :class:`RunDir`, :func:`unit_seed`.

**Resuming.** An experiment's work is cut into *units* (a batch of pairs, a batch of rollouts) with stable string
keys. :class:`RunDir` writes each finished unit as one JSON file, atomically
(:func:`emokern.util.files.atomic_write_json`: a temporary file and a rename), and a run started again in the same
``--out`` with the same configuration skips every unit whose file exists. A unit's random seed is derived from the run seed and the unit key (:func:`unit_seed`), never
from how many units ran before, so a resumed run samples exactly what an uninterrupted one would have (same machine,
dtype, threads and versions). Starting with a different configuration in a directory that holds another raises
:class:`RunConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence, Union

import torch

from emokern.util.files import atomic_write_json
from emokern.util.progress import progress_bar

__all__ = ["RunConfigError", "RunDir", "json_default", "unit_seed"]


def json_default(x: Any) -> Any:
    """The ``default`` of every JSON file a run writes: a tensor becomes its nested list (``tolist``), a path its
    string, a NumPy or torch scalar (anything with ``.item()``) its Python number; anything else raises TypeError."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class RunConfigError(ValueError):
    """The output directory holds a run with another configuration."""


class RunDir:
    """An experiment's output folder: ``config.json``, ``units/<key>.json`` (finished work), results and plots.

    Every file is written atomically with :func:`json_default` for tensors and paths (NaN and infinity are refused).

    Args:
        path: the folder (created).
        config: everything that determines the results (JSON-serialisable). If the folder already holds a
            ``config.json`` that differs, :class:`RunConfigError` names the differing keys, unless ``overwrite``,
            which deletes the finished units and starts afresh.
    """

    def __init__(self, path: Union[str, os.PathLike], config: Mapping[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out: the output directory {str(self.path)!r} cannot be created: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"out: the output directory {str(self.path)!r} is not writable")
        self.units = self.path / "units"
        config = json.loads(json.dumps(dict(config), default=json_default))
        existing = self.path / "config.json"
        if existing.is_file() and not overwrite:
            old = json.loads(existing.read_text())
            if old != config:
                keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise RunConfigError(
                    f"out: {str(self.path)!r} holds a run with another configuration (differs in {keys}); give "
                    f"another --out, or --overwrite to discard its finished work")
        if overwrite and self.units.is_dir():
            for f in self.units.glob("*.json"):
                f.unlink()
        self.units.mkdir(exist_ok=True)
        atomic_write_json(existing, config, default=json_default)
        self.config = config

    def _unit_file(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.+=-]", "_", key)
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]  # keys that map to the same safe name stay apart
        return self.units / f"{safe}.{digest}.json"

    def has(self, key: str) -> bool:
        """Whether unit ``key`` has finished (its file exists)."""
        return self._unit_file(key).is_file()

    def load(self, key: str) -> Any:
        """The saved result of unit ``key`` (FileNotFoundError when it has not finished)."""
        return json.loads(self._unit_file(key).read_text())

    def save(self, key: str, value: Any) -> None:
        """Save ``value`` as the result of unit ``key``, atomically."""
        atomic_write_json(self._unit_file(key), value, default=json_default)

    def run_units(self, keys: Sequence[str], work: Callable[[str], Any], *, desc: str, progress: bool = True,
                  unit: str = "unit") -> Dict[str, Any]:
        """Run ``work(key)`` for every key without a saved result (saving each as it finishes); return all results.

        The progress bar counts finished units as already done, so its ETA is that of the remaining work.
        """
        todo = [k for k in keys if not self.has(k)]
        bar = progress_bar(len(keys), desc=desc, enabled=progress, initial=len(keys) - len(todo), unit=unit)
        try:
            for key in todo:
                self.save(key, work(key))
                bar.update(1)
        finally:
            bar.close()
        return {k: self.load(k) for k in keys}

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` to ``<path>/<name>`` atomically; returns that path."""
        return atomic_write_json(self.path / name, obj, default=json_default)




def unit_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the run seed and a unit's identity (``sha256`` of the JSON of ``[seed, *parts]``, parts
    that JSON cannot hold as their ``str``), independent of the order units run in."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
