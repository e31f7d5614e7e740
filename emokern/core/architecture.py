"""Where a causal LM keeps its decoder layers and the parts emokern hooks: one table of families, one way to pick
layers, and the user's override (:class:`ArchSpec`).

Three callers, three questions, one module:

* the Hugging Face patch (:mod:`emokern.engines.hf`), extraction (:mod:`emokern.extraction.extract`) and the
  validation checks ask for a ``transformers`` model's base model, decoder layers and, inside a layer, the attention
  and MLP outputs (:func:`resolve_architecture`, :func:`site_module`): the family table :data:`ARCHITECTURES` by
  ``config.model_type``, or an :class:`ArchSpec` the user passes for another family;
* the vLLM worker (:mod:`emokern.engines.vllm.worker`) asks for the decoder layers of vLLM's own model classes,
  whose attribute paths differ from the ``transformers`` ones for some families (:func:`find_decoder_layers`,
  :data:`VLLM_LAYER_PATHS`);
* the model fingerprint (:func:`emokern.core.models.model_fingerprint`) must not depend on any family table,
  so that a fingerprint never changes when a family is added: it takes the first ``ModuleList`` with
  ``num_hidden_layers`` entries (:func:`layer_list_of_length`).

Layer selections (``layers=`` of :func:`emokern.patch` and of extraction) are read by :func:`select_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["ARCHITECTURES", "ArchSpec", "SITES", "UnsupportedModelError", "VLLM_LAYER_PATHS", "find_decoder_layers",
           "get_module", "layer_list_of_length", "resolve_architecture", "select_layers", "site_module", "text_config"]

# The places in a decoder layer that can be patched: the layer's output (the residual stream), and the attention
# and MLP blocks' outputs before they join the residual stream.
SITES = ("residual", "attn", "mlp")


@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps its parts (dotted attribute paths).

    Attributes:
        base: the base model, relative to the causal-LM object: it owns the decoder layers and receives the cache.
        layers: the ModuleList of decoder layers, relative to ``base``.
        attn: within a decoder layer, the module whose output is the attention block's contribution to the
            residual stream (for Gemma 3, the post-attention norm that follows attention).
        mlp: the same for the MLP block.
    """

    base: str
    layers: str
    attn: str
    mlp: str


_LLAMA_LIKE = ArchSpec(base="model", layers="layers", attn="self_attn", mlp="mlp")
_GEMMA3 = ArchSpec(base="model", layers="layers", attn="post_attention_layernorm", mlp="post_feedforward_layernorm")
# The ``transformers`` families emokern knows, by ``config.model_type``.
ARCHITECTURES: Dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _GEMMA3,
    "gemma3": ArchSpec(base="model.language_model", layers="layers", attn=_GEMMA3.attn, mlp=_GEMMA3.mlp),
    "gpt2": ArchSpec(base="transformer", layers="h", attn="attn", mlp="mlp"),
}

# The decoder-layer list of vLLM's model classes, relative to the runner's model object, tried in this order
# (vLLM's Gemma 3 wrapper has moved its language model between releases, hence two paths for it).
VLLM_LAYER_PATHS = ("model.layers", "language_model.model.layers", "model.language_model.layers", "transformer.h")


class UnsupportedModelError(ValueError):
    """The model's architecture is not in :data:`ARCHITECTURES` and no ``arch=`` was given, or its modules are not
    where the family's (or the given) :class:`ArchSpec` says."""


def text_config(config):
    """The part of a ``transformers`` config that describes the language model: ``config.get_text_config()`` where
    the config has it (multimodal configs such as Gemma 3's keep ``hidden_size`` and ``num_hidden_layers`` there),
    else ``config`` itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def get_module(obj, path: str):
    """``obj`` followed along the dotted attribute ``path`` (``"model.layers"``); AttributeError if a step is
    missing."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_architecture(model, arch: Optional[ArchSpec] = None
                         ) -> Tuple[ArchSpec, torch.nn.Module, torch.nn.ModuleList]:
    """``(spec, base, layers)`` of a ``transformers`` causal LM: the :class:`ArchSpec` used (``arch`` if given, else
    :data:`ARCHITECTURES` of ``model.config.model_type``), the base model and its decoder-layer list.

    Raises :class:`UnsupportedModelError` naming the known families and the fix (``arch=``) when the model type is
    unknown and no ``arch`` is given, or when the spec's paths do not exist in the model.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = arch or ARCHITECTURES.get(model_type)
    if spec is None:
        looked = sorted({f"{s.base}.{s.layers}" for s in ARCHITECTURES.values()})
        raise UnsupportedModelError(
            f"emokern does not know model_type {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))}). It looks "
            f"for decoder layers at {', '.join(looked)} and, inside each layer, for the attention and MLP outputs "
            f"(e.g. 'self_attn'/'mlp'). Pass them explicitly: emokern.patch(model, bank, arch=emokern.ArchSpec("
            f"base='model', layers='layers', attn='self_attn', mlp='mlp'))."
        )
    try:
        base = get_module(model, spec.base)
        layers = get_module(base, spec.layers)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: expected the decoder layers at '{spec.base}.{spec.layers}' but {exc}. Pass "
            f"arch=emokern.ArchSpec(...) with the right module names."
        ) from None
    return spec, base, layers


def site_module(block: torch.nn.Module, site: str, spec: ArchSpec) -> torch.nn.Module:
    """The module of decoder layer ``block`` whose output is ``site`` (one of :data:`SITES`): the layer itself for
    ``"residual"``, else the module at ``spec.attn`` or ``spec.mlp`` inside it."""
    if site not in SITES:
        raise ValueError(f"site_module: 'site' must be one of {SITES}; got {site!r}")
    return block if site == "residual" else get_module(block, getattr(spec, site))


def select_layers(layers, num_layers: int) -> List[int]:
    """Sorted, distinct layer indices of a model with ``num_layers`` decoder layers, from ``layers``: None (all),
    an int (negative counts from the end), a float in [0, 1] (that fraction of depth, ``round(x * (num_layers -
    1))``), a slice, or a sequence of ints and floats.

    Raises TypeError for anything else (bools included), ValueError for an index out of range, a fraction outside
    [0, 1] or an empty selection.
    """
    def one(x) -> int:
        if isinstance(x, bool):
            raise TypeError(f"layers: expected an int, a float fraction, a slice or a list; got {x!r}")
        if isinstance(x, float):
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"layers: a float is a fraction of depth in [0, 1]; got {x}")
            return int(round(x * (num_layers - 1)))
        if isinstance(x, int):
            i = x + num_layers if x < 0 else x
            if not 0 <= i < num_layers:
                raise ValueError(f"layers: index {x} is out of range for a model with {num_layers} layers")
            return i
        raise TypeError(f"layers: expected an int, a float fraction, a slice or a list; got {type(x).__name__}")

    if layers is None:
        out = list(range(num_layers))
    elif isinstance(layers, slice):
        out = list(range(num_layers))[layers]
    elif isinstance(layers, (int, float)):
        out = [one(layers)]
    else:
        out = [one(x) for x in layers]
    if not out:
        raise ValueError(f"layers: the selection {layers!r} is empty")
    return sorted(set(out))


def find_decoder_layers(model, paths: Sequence[str] = VLLM_LAYER_PATHS) -> torch.nn.ModuleList:
    """The decoder layers of a model without a family table (vLLM's model classes): the first of ``paths``
    (dotted, relative to ``model``) that exists and is a ``ModuleList``.

    Raises RuntimeError naming the model's class and the paths tried when none is.
    """
    for path in paths:
        try:
            obj = get_module(model, path)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise RuntimeError(f"emokern: cannot find the decoder layers of {type(model).__name__} (looked at "
                       f"{', '.join(paths)})")


def layer_list_of_length(model: torch.nn.Module, num_layers: Optional[int]) -> Optional[torch.nn.ModuleList]:
    """The first ``nn.ModuleList`` (in ``named_modules`` order) with exactly ``num_layers`` entries, or None (also
    when ``num_layers`` is 0 or None). Family-independent on purpose: the model fingerprint relies on it."""
    if not num_layers:
        return None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    return None
