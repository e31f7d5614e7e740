"""The operator's configuration of the plugin: which bank, which layers, how many traces to keep.

Everything comes from environment variables, read in every vLLM process (the front end that validates requests,
and each worker that installs the op), so that one ``export`` configures the whole engine, also for
``vllm serve``:

* ``EMOKERN_VLLM_BANK`` — path of a :class:`~emokern.VectorBank` (``NAME.json``). Unset: the plugin is inert.
* ``EMOKERN_VLLM_LAYERS`` — comma-separated decoder-layer indices where the op is installed (default: the bank's
  :meth:`~emokern.VectorBank.two_thirds_layer`, where emokern steers by default). Every layer must be in the bank.
* ``EMOKERN_VLLM_DISABLE=1`` — kill switch: the plugin does nothing even when a bank is named.
* ``EMOKERN_VLLM_MAX_TRACES`` — finished requests whose trace is kept until fetched (default 4096; the oldest go
  first), so a server whose clients never fetch does not grow without bound.
* ``EMOKERN_VLLM_REGISTRY_SLOTS`` — room for vectors registered at run time (:mod:`emokern.engines.vllm.registry`):
  the op's vector buffer gets this many extra rows after the bank's K, zero until a vector is registered into one.
  Default 0: no registry, and ``vllm serve`` has no registration endpoint (404). Its admin token,
  ``EMOKERN_VLLM_ADMIN_TOKEN``, is read by the server only (:mod:`emokern.engines.vllm.registry`).

The bank's vectors are sent to no one per request: each process loads the file once (:func:`load`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from emokern.util.stats import unit_rows

__all__ = ["Config", "from_env", "load"]

ENV_BANK = "EMOKERN_VLLM_BANK"
ENV_LAYERS = "EMOKERN_VLLM_LAYERS"
ENV_DISABLE = "EMOKERN_VLLM_DISABLE"
ENV_MAX_TRACES = "EMOKERN_VLLM_MAX_TRACES"
ENV_REGISTRY_SLOTS = "EMOKERN_VLLM_REGISTRY_SLOTS"
MAX_REGISTRY_SLOTS = 64  # each slot adds a column to every projection of every token: keep the op's cost bounded


@dataclass(frozen=True)
class Config:
    """The parsed environment: ``bank_path``, the ``layers`` asked for (None: the bank's default),
    ``max_traces`` and ``registry_slots`` (0: no run-time registration)."""

    bank_path: str
    layers: Optional[Tuple[int, ...]]
    max_traces: int
    registry_slots: int = 0


def _int_list(name: str, text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated layer indices such as '15,19'; got {text!r}") from None
    if not values:
        raise ValueError(f"{name}: expected at least one layer index; got {text!r}")
    return values


def from_env() -> Optional[Config]:
    """The configuration, or None when the plugin is off (no bank named, or the kill switch set)."""
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return None
    path = os.environ.get(ENV_BANK, "").strip()
    if not path:
        return None
    layers_text = os.environ.get(ENV_LAYERS, "").strip()
    layers = _int_list(ENV_LAYERS, layers_text) if layers_text else None
    max_text = os.environ.get(ENV_MAX_TRACES, "4096").strip()
    try:
        max_traces = int(max_text)
    except ValueError:
        raise ValueError(f"{ENV_MAX_TRACES}: expected a positive integer; got {max_text!r}") from None
    if max_traces < 1:
        raise ValueError(f"{ENV_MAX_TRACES}: expected a positive integer; got {max_traces}")
    slots_text = os.environ.get(ENV_REGISTRY_SLOTS, "0").strip() or "0"
    try:
        slots = int(slots_text)
    except ValueError:
        raise ValueError(f"{ENV_REGISTRY_SLOTS}: expected an integer from 0 to {MAX_REGISTRY_SLOTS}; got "
                         f"{slots_text!r}") from None
    if not 0 <= slots <= MAX_REGISTRY_SLOTS:
        raise ValueError(f"{ENV_REGISTRY_SLOTS}: expected an integer from 0 to {MAX_REGISTRY_SLOTS}; got {slots}")
    return Config(path, layers, max_traces, slots)


@dataclass
class Loaded:
    """A process's copy of the bank with what the op and the spec parser need, per installed layer.

    ``layers``: the installed decoder layers (sorted); ``unit_vectors`` (S, K, d) fp32 unit-normalised bank vectors
    at those layers; ``residual_norm`` (S,) the strength unit per layer; ``neutral_mean`` / ``neutral_std`` (S, K)
    or None.
    """

    config: Config
    bank: "object"
    layers: List[int]
    unit_vectors: torch.Tensor
    residual_norm: List[float]
    neutral_mean: Optional[torch.Tensor]
    neutral_std: Optional[torch.Tensor]

    @property
    def names(self) -> List[str]:
        return list(self.bank.names)


@functools.lru_cache(maxsize=4)
def _load(config: Config) -> Loaded:
    from emokern.core.bank import VectorBank

    bank = VectorBank.load(config.bank_path)
    layers = sorted(set(config.layers)) if config.layers else [bank.two_thirds_layer()]
    missing = [layer for layer in layers if layer not in bank.layers]
    if missing:
        raise ValueError(f"{ENV_LAYERS}: the bank {config.bank_path} has no vectors for layers {missing}; it covers "
                         f"{bank.layers}")
    slots = [bank.layer_slot(layer) for layer in layers]
    vectors = bank.vectors[slots]
    unit = unit_rows(vectors)  # unit directions, as in emokern.engines.hf
    has_stats = bank.neutral_mean is not None and bank.neutral_std is not None
    return Loaded(config, bank, layers, unit.contiguous(), [float(bank.residual_norm[s]) for s in slots],
                  bank.neutral_mean[slots].float() if has_stats else None,
                  bank.neutral_std[slots].float() if has_stats else None)


def fingerprint(config: Config) -> str:
    """What the op installed by this configuration depends on (emokern's version, the bank's tensors, the layers),
    as a string for vLLM's compile-cache key: a graph compiled without the op, or with another bank, must not be
    loaded for this one. Reads only the bank's JSON (the tensors' SHA-256 recorded there)."""
    from emokern.version import __version__
    from emokern.core.bank import bank_paths

    try:
        tensors_sha = json.loads(bank_paths(config.bank_path)[1].read_text()).get("tensors_sha256")
    except (OSError, ValueError):
        tensors_sha = None  # load() reports the unreadable bank when the model is installed
    registry = f" registry_slots={config.registry_slots}" if config.registry_slots else ""  # 0: keep old caches
    return f"emokern {__version__} op=residual_site_ bank={tensors_sha or config.bank_path} layers={config.layers}" \
           f"{registry}"


def load(config: Optional[Config] = None) -> Loaded:
    """The bank named by ``config`` (default: the environment's), loaded once per process and configuration."""
    config = config or from_env()
    if config is None:
        raise RuntimeError(f"emokern.engines.vllm: no bank configured (set {ENV_BANK}=path/to/bank.json, and unset "
                           f"{ENV_DISABLE})")
    return _load(config)
