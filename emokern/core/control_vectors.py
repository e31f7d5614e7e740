"""llama.cpp control vectors from a bank: write a weighted mix of emotions as the GGUF file ``llama-cli
--control-vector`` reads, and read such a file back.

::

    export_gguf_control_vector(bank, "calm.gguf", {"calm": 1.0, "desperate": -0.5})
    read_gguf_control_vector("calm.gguf").directions   # {layer: (d,) float32}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from emokern.core.bank import VectorBank
from emokern.util.files import atomic_path
from emokern.util.stats import unit_rows

__all__ = ["ControlVectorFile", "export_gguf_control_vector", "read_gguf_control_vector"]

# llama.cpp's GGUF architecture name for each Hugging Face model_type that emokern patches (convert_hf_to_gguf.py
# converts MistralForCausalLM with its Llama class). llama.cpp only prints controlvector.model_hint; it never checks it.
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
              "gemma3": "gemma3", "gpt2": "gpt2"}


@dataclasses.dataclass
class ControlVectorFile:
    """A llama.cpp control-vector GGUF as read by :func:`read_gguf_control_vector`."""

    directions: Dict[int, torch.Tensor]  # llama.cpp block index (>= 1) -> (n_embd,) float32
    metadata: Dict[str, object]  # every key/value pair of the file, GGUF header fields excluded


def _mixed_direction(bank: VectorBank,
                     weights: Union[str, Mapping[str, float]]) -> Tuple[Dict[str, float], torch.Tensor]:
    """The checked weights and Σ_k w_k · v̂[:, k] as (L, d) float64, v̂ the bank's vectors at unit length."""
    if isinstance(weights, str):
        weights = {weights: 1.0}
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights: expected an emotion name or a non-empty {{name: weight}} mapping; got {weights!r}")
    checked = {}
    for name, w in weights.items():
        bank.index(name)  # raises KeyError naming the closest matches
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{name!r}]: expected a finite number; got {w!r}")
        checked[name] = float(w)
    # Unit length, as emokern.engines.hf uses the vectors, so that the strengths mean the same in both.
    unit = unit_rows(bank.vectors.double())
    mix = sum(w * unit[:, bank.index(name)] for name, w in checked.items())
    return checked, mix


def export_gguf_control_vector(bank: VectorBank, path: Union[str, os.PathLike],
                               weights: Union[str, Mapping[str, float]], *, layers: Optional[Sequence[int]] = None,
                               scale_by_residual_norm: bool = True, model_hint: Optional[str] = None) -> Path:
    """Write a weighted mix of the bank's emotions as a llama.cpp control vector (``llama-cli --control-vector``).

    The file follows what llama.cpp's loader (``common_control_vector_load_one`` in ``common/common.cpp``) and
    applier (``llama_adapter_cvec::apply`` in ``src/llama-adapter.cpp``) expect:

    * metadata ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (string: the llama.cpp
      architecture, e.g. ``"llama"``; informational, llama.cpp does not check it) and ``controlvector.layer_count``
      (int32: the number of direction tensors), as llama.cpp's own ``cvector-generator`` writes them;
    * one F32, 1-D tensor of n_embd values per steered layer, named ``direction.<il>``. llama.cpp adds
      ``strength × direction.<il>`` to the output of block ``il`` (0-based; the ``l_out`` tensor, after the FFN
      residual add) on every token. That is emokern's layer ``il`` (the output of Hugging Face decoder layer
      ``il``), so the bank's layer indices are written unchanged. Index 0 is rejected by llama.cpp: block 0 cannot
      be steered.

    Values: ``direction.<il> = c_il · Σ_k weights[k] · v_k,il`` with the bank's vectors ``v`` at unit length (as
    :func:`emokern.engines.hf.patch` uses them), where ``c_il`` is ``bank.residual_norm`` at that layer
    (``scale_by_residual_norm=True``) or 1. With the default, llama.cpp
    strength ``s`` (``--control-vector`` is 1.0, ``--control-vector-scaled FILE s``) steers like
    ``emokern.engines.hf`` with strengths ``{k: s · weights[k]}`` at those layers:
    ``h += s · w_k · mean‖h_il‖ · v_k``, the paper's unit. Note that llama.cpp steers every token of the context
    (the paper's whole-transcript steering needs strengths about 10× smaller than position-restricted steering),
    and that the residual norms were measured on the Hugging Face model the bank was made from.

    Args:
        bank: the source bank.
        path: the .gguf file to write (replaced atomically).
        weights: an emotion name (weight 1) or ``{name: weight}``; unknown names raise ``KeyError`` with close
            matches.
        layers: the bank layers to write; default: all of them except 0. For the paper's single mid-late layer, pass
            ``[bank.metadata["default_layer"]["two_thirds"]]`` (or narrow with llama.cpp's
            ``--control-vector-layer-range``).
        scale_by_residual_norm: scale each layer's direction by its mean residual norm (see above).
        model_hint: ``controlvector.model_hint``; default: llama.cpp's name for the bank's recorded
            ``metadata["model"]["model_type"]``, that type itself if llama.cpp's name is unknown here, else
            ``"unknown"``.

    Returns:
        The path written. emokern's own keys (``controlvector.emokern.*``: the weights as JSON, the scale, the
        bank's model id and fingerprint) are added for :func:`read_gguf_control_vector`; llama.cpp ignores them.
    """
    import gguf
    import numpy as np

    checked, mix = _mixed_direction(bank, weights)
    if layers is None:
        layers = [layer for layer in bank.layers if layer >= 1]
        if not layers:
            raise ValueError(f"bank: llama.cpp cannot steer block 0, and the bank has no other layer ({bank.layers})")
    else:
        layers = sorted(set(int(x) for x in layers))
        if not layers:
            raise ValueError("layers: expected at least one layer; got an empty selection")
        for layer in layers:
            if layer < 1:
                raise ValueError(f"layers: llama.cpp control vectors cannot steer block {layer} (direction indices "
                                 f"start at 1); got {layers}")
            bank.layer_slot(layer)  # raises naming the bank's layers
    if model_hint is None:
        model_type = (bank.metadata.get("model") or {}).get("model_type")
        model_hint = _GGUF_ARCH.get(model_type, model_type) or "unknown"

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_int32("controlvector.layer_count", len(layers))
        writer.add_string("controlvector.emokern.weights", json.dumps(checked))
        writer.add_string("controlvector.emokern.scale", "residual_norm" if scale_by_residual_norm else "unit")
        writer.add_string("controlvector.emokern.model_id", bank.model_id)
        writer.add_string("controlvector.emokern.fingerprint", bank.fingerprint)
        for layer in layers:
            slot = bank.layer_slot(layer)
            scale = float(bank.residual_norm[slot]) if scale_by_residual_norm else 1.0
            writer.add_tensor(f"direction.{layer}", (mix[slot] * scale).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf_control_vector(path: Union[str, os.PathLike]) -> ControlVectorFile:
    """Read a llama.cpp control-vector GGUF (emokern's or another tool's), checking what llama.cpp checks.

    Raises ``ValueError`` when ``general.architecture`` is not ``"controlvector"``, or a tensor is not named
    ``direction.<N>`` with N >= 1, is not F32, is not 1-D, or differs in length from the others.
    """
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: control-vector file {path} does not exist")
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    if metadata.get("general.architecture") != "controlvector":
        raise ValueError(f"{path}: expected general.architecture 'controlvector'; got "
                         f"{metadata.get('general.architecture')!r}")
    directions: Dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise ValueError(f"{path}: expected tensors named direction.<N> with N >= 1; got {tensor.name!r}")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(f"{path}: tensor {tensor.name} must be 1-D F32; got type "
                             f"{gguf.GGMLQuantizationType(tensor.tensor_type).name}, shape {list(tensor.shape)}")
        directions[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    sizes = {v.numel() for v in directions.values()}
    if len(sizes) > 1:
        raise ValueError(f"{path}: direction tensors must all have the same length; got {sorted(sizes)}")
    return ControlVectorFile(directions=dict(sorted(directions.items())), metadata=metadata)
