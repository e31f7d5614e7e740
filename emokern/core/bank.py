"""``VectorBank``: named vectors per layer for one model, with the metadata needed to use them safely.

A bank holds ``vectors`` (L, K, d) — K named directions (emotions) at each of L layers — plus:

* ``layers``: the model layer index of each of the L slices;
* ``model_id`` / ``fingerprint`` / ``hidden_size``: which model the vectors belong to (see
  :func:`emokern.core.models.model_fingerprint`); loading onto another model is refused;
* ``residual_norm`` (L,): the mean residual-stream norm at each layer — the unit of steering strength, so that
  strength 0.05 means "0.05 of the typical hidden-state norm" as in the paper;
* optional ``neutral_mean`` / ``neutral_std`` (L, K): projection statistics on emotionally neutral text, for
  z-scores;
* ``extra``: further named tensors kept with the bank (e.g. ``raw_vectors`` before denoising);
* ``metadata``: free-form JSON (recipe, corpus statistics, ...).

On disk a bank is two files sharing a stem: ``NAME.safetensors`` (the tensors) and ``NAME.json`` (everything else,
plus the SHA-256 of the tensor file, verified on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from emokern.util.files import atomic_path
from emokern.util.names import did_you_mean

__all__ = ["VectorBank", "BankMismatchError", "BankFileError", "bank_paths", "bank_stem"]

FORMAT_VERSION = 1


class BankMismatchError(ValueError):
    """The bank was made for another model (hidden size or fingerprint differ)."""


class BankFileError(ValueError):
    """A bank file is missing, malformed or corrupted."""


def bank_paths(path: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """``(tensors, metadata)`` paths for a bank given as ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def bank_stem(out_dir: Union[str, os.PathLike], model_name: str) -> Path:
    """Where ``emokern extract`` puts the bank of ``model_name`` under ``out_dir``, without its suffix:
    ``out_dir/bank/<the model name's last path part, characters other than letters, digits, - _ . replaced by _>``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(model_name)).name)
    return Path(out_dir) / "bank" / safe


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class VectorBank:
    """Named vectors per layer; see the module docstring for every field's meaning."""

    vectors: torch.Tensor  # (L, K, d) float32
    names: List[str]
    layers: List[int]
    residual_norm: torch.Tensor  # (L,) float32
    model_id: str = ""
    fingerprint: str = ""
    neutral_mean: Optional[torch.Tensor] = None  # (L, K)
    neutral_std: Optional[torch.Tensor] = None  # (L, K)
    metadata: Dict = field(default_factory=dict)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.vectors.dim() != 3:
            raise ValueError(f"VectorBank: 'vectors' must have shape (L, K, d); got {tuple(self.vectors.shape)}")
        L, K, d = self.vectors.shape
        if K == 0 or L == 0:
            raise ValueError(f"VectorBank: 'vectors' must hold at least one layer and one vector; got {(L, K, d)}")
        if len(self.names) != K:
            raise ValueError(f"VectorBank: 'names' must have one name per vector (K = {K}); got {len(self.names)}")
        if len(set(self.names)) != K:
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"VectorBank: 'names' must be unique; duplicated: {dupes}")
        if len(self.layers) != L or len(set(self.layers)) != L:
            raise ValueError(f"VectorBank: 'layers' must list L = {L} distinct layer indices; got {self.layers}")
        if tuple(self.residual_norm.shape) != (L,):
            raise ValueError(f"VectorBank: 'residual_norm' must have shape (L,) = ({L},); got {tuple(self.residual_norm.shape)}")
        if not bool(torch.isfinite(self.vectors).all()):
            raise ValueError("VectorBank: 'vectors' must not contain NaN or Inf")
        if not bool((self.residual_norm > 0).all()):
            raise ValueError("VectorBank: 'residual_norm' must be positive at every layer")
        for name in ("neutral_mean", "neutral_std"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (L, K):
                raise ValueError(f"VectorBank: '{name}' must have shape (L, K) = ({L}, {K}); got {tuple(t.shape)}")
        self.vectors = self.vectors.float().contiguous()
        self.residual_norm = self.residual_norm.float()
        self.layers = [int(x) for x in self.layers]

    # ---------------------------------------------------------------------------------------------- lookup
    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[2]

    def index(self, name: str) -> int:
        """Position of emotion ``name``; an unknown name raises with the closest matches."""
        try:
            return self.names.index(name)
        except ValueError:
            hint = did_you_mean(name, self.names)
            raise KeyError(f"emotion {name!r} is not in this bank ({len(self.names)} names){hint}") from None

    def layer_slot(self, layer: int) -> int:
        """Position of model layer ``layer`` in ``vectors``; raises if the bank has no vectors there."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"the bank has no vectors for layer {layer}; it covers layers {self.layers}") from None

    def default_layer(self) -> tuple[int, str]:
        """The layer to read and steer when none is given, and where it came from, by the first rule that applies:

        1. ``metadata["default_layer"]["chosen"]`` (written by :func:`emokern.extraction.extract.extract_bank`: the layer of
           best held-out accuracy on a validation split of the training premises, never the test premises);
        2. ``metadata["default_layer"]["two_thirds"]`` (banks made before the validation choice), or an int
           ``metadata["default_layer"]``;
        3. the bank layer at two thirds of the bank's layer list.

        A recorded layer that is not among :attr:`layers` is skipped.
        """
        recorded = self.metadata.get("default_layer")
        if isinstance(recorded, dict):
            for key in ("chosen", "two_thirds"):
                if isinstance(recorded.get(key), int) and recorded[key] in self.layers:
                    return recorded[key], f"bank.metadata['default_layer']['{key}']"
        elif isinstance(recorded, int) and not isinstance(recorded, bool) and recorded in self.layers:
            return recorded, "bank.metadata['default_layer']"
        return self.layers[round(2 * (len(self.layers) - 1) / 3)], "two thirds of the bank's layers"

    def two_thirds_layer(self) -> int:
        """The bank layer at about two thirds of the model's depth, the paper's mid-late layer, where emokern steers
        by default (the readout layer of :meth:`default_layer` can be the last one, where steering only nudges the
        logits): ``metadata["default_layer"]["two_thirds"]`` when recorded and in :attr:`layers`, else the layer
        nearest round(2/3·(N−1)) for ``metadata["model"]["num_hidden_layers"]`` = N, else the bank layer at two
        thirds of its layer list."""
        recorded = self.metadata.get("default_layer")
        if isinstance(recorded, dict) and isinstance(recorded.get("two_thirds"), int) \
                and recorded["two_thirds"] in self.layers:
            return recorded["two_thirds"]
        depth = (self.metadata.get("model") or {}).get("num_hidden_layers")
        if isinstance(depth, int) and depth > 0:
            target = round(2 / 3 * (depth - 1))
            return min(self.layers, key=lambda x: (abs(x - target), x))
        return self.layers[round(2 * (len(self.layers) - 1) / 3)]

    def vector(self, name: str, layer: int) -> torch.Tensor:
        """The (d,) vector of emotion ``name`` at model layer ``layer``."""
        return self.vectors[self.layer_slot(layer), self.index(name)]

    # ---------------------------------------------------------------------------------------------- model check
    def check_model(self, model, *, force: bool = False) -> None:
        """Refuse a model with another hidden size (always) or another fingerprint (unless ``force``)."""
        from emokern.core.models import model_fingerprint

        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None and hasattr(model, "config") and hasattr(model.config, "get_text_config"):
            hidden = model.config.get_text_config().hidden_size
        if hidden is not None and hidden != self.hidden_size:
            raise BankMismatchError(
                f"the bank's vectors have hidden size {self.hidden_size} (made for {self.model_id or 'an unnamed model'}) "
                f"but the model's hidden size is {hidden}"
            )
        if self.fingerprint and not force:
            actual = model_fingerprint(model)
            if actual != self.fingerprint:
                raise BankMismatchError(
                    f"the bank was made for model {self.model_id or '?'} with fingerprint {self.fingerprint}, but this "
                    f"model's fingerprint is {actual}. Pass force=True to use it anyway (the hidden sizes match)."
                )

    # ---------------------------------------------------------------------------------------------- files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``NAME.safetensors`` and ``NAME.json`` (atomically: temp files, then rename). Returns the JSON path."""
        from safetensors.torch import save_file

        tensors_path, meta_path = bank_paths(path)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.contiguous(), "residual_norm": self.residual_norm.contiguous()}
        for name in ("neutral_mean", "neutral_std"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.float().contiguous()
        for name, t in self.extra.items():
            tensors[f"extra.{name}"] = t.contiguous()
        from emokern.version import __version__

        # Both files are written to temporary files first; then the tensors are renamed into place, then the JSON
        # (which records the tensors' hash), so a failure before the renames leaves the old bank whole.
        with atomic_path(meta_path) as tmp_meta, atomic_path(tensors_path) as tmp_tensors:
            save_file(tensors, str(tmp_tensors))
            meta = {
                "format": "emokern.VectorBank", "format_version": FORMAT_VERSION, "emokern_version": __version__,
                "names": self.names, "layers": self.layers, "hidden_size": self.hidden_size,
                "model_id": self.model_id, "fingerprint": self.fingerprint, "metadata": self.metadata,
                "tensors_file": tensors_path.name, "tensors_sha256": _sha256(tmp_tensors),
            }
            tmp_meta.write_text(json.dumps(meta, indent=1))
        return meta_path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, model=None, force: bool = False) -> "VectorBank":
        """Read a bank, verify its checksum and, when ``model`` is given, that it belongs to that model."""
        from safetensors.torch import load_file

        tensors_path, meta_path = bank_paths(path)
        for p in (meta_path, tensors_path):
            if not p.is_file():
                raise BankFileError(f"bank file {p} does not exist (a bank is NAME.json + NAME.safetensors)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise BankFileError(f"bank metadata {meta_path} is not valid JSON: {exc}") from None
        if meta.get("format") != "emokern.VectorBank":
            raise BankFileError(f"{meta_path} is not an emokern VectorBank file (format = {meta.get('format')!r})")
        actual = _sha256(tensors_path)
        if actual != meta.get("tensors_sha256"):
            raise BankFileError(
                f"bank tensors {tensors_path} are corrupted or were changed: SHA-256 {actual} does not match the "
                f"recorded {meta.get('tensors_sha256')}"
            )
        tensors = load_file(str(tensors_path))
        bank = cls(
            vectors=tensors["vectors"], names=list(meta["names"]), layers=list(meta["layers"]),
            residual_norm=tensors["residual_norm"], model_id=meta.get("model_id", ""),
            fingerprint=meta.get("fingerprint", ""), neutral_mean=tensors.get("neutral_mean"),
            neutral_std=tensors.get("neutral_std"), metadata=meta.get("metadata", {}),
            extra={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
        )
        if model is not None:
            bank.check_model(model, force=force)
        return bank

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_tensors(cls, vectors: torch.Tensor, names: Sequence[str], *, layers: Optional[Sequence[int]] = None,
                     residual_norm: Optional[torch.Tensor] = None, model=None, **kwargs) -> "VectorBank":
        """Build a bank from (L, K, d) vectors; ``model`` (optional) fills the identity fields."""
        L = vectors.shape[0]
        if model is not None:
            from emokern.core.models import model_fingerprint

            kwargs.setdefault("model_id", getattr(getattr(model, "config", None), "_name_or_path", "") or
                              type(model).__name__)
            kwargs.setdefault("fingerprint", model_fingerprint(model))
        return cls(
            vectors=vectors, names=list(names), layers=list(range(L)) if layers is None else list(layers),
            residual_norm=torch.ones(L) if residual_norm is None else residual_norm, **kwargs,
        )
