"""Architecture discovery (:mod:`emokern.core.architecture`): the family table, the user's override, sites, layer
selections, the vLLM layer paths and the fingerprint's family-independent layer list."""

import types

import pytest
import torch

import emokern
from emokern.core import architecture as arch
from emokern.core.architecture import (ARCHITECTURES, ArchSpec, UnsupportedModelError, find_decoder_layers,
                                       get_module, layer_list_of_length, resolve_architecture, select_layers,
                                       site_module, text_config)
from emokern.testing.families import FAMILIES, LAYERS, tiny_bank, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves_to_its_decoder_layers_and_sites(family):
    model = tiny_model(family)
    spec, base, layers = resolve_architecture(model)
    assert spec is ARCHITECTURES[family]
    assert base is get_module(model, spec.base)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == LAYERS
    assert layers is get_module(model, f"{spec.base}.{spec.layers}")
    block = layers[1]
    assert site_module(block, "residual", spec) is block
    for site in ("attn", "mlp"):
        module = site_module(block, site, spec)
        assert module is get_module(block, getattr(spec, site))
        assert module in list(block.modules()) and module is not block
    # the fingerprint's discovery finds the same list without the table
    assert layer_list_of_length(model, model.config.num_hidden_layers) is layers


def test_unknown_family_needs_an_arch_spec_and_a_wrong_spec_is_refused():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="'mystery'.*known: gemma3, gemma3_text, gpt2, llama"):
        resolve_architecture(model)
    given = ArchSpec("model", "layers", "self_attn", "mlp")
    spec, base, layers = resolve_architecture(model, given)
    assert spec is given and layers is model.model.layers
    with pytest.raises(UnsupportedModelError, match="'transformer.h'"):
        resolve_architecture(model, ArchSpec("transformer", "h", "attn", "mlp"))
    with pytest.raises(ValueError, match="'site' must be one of"):
        site_module(layers[0], "ffn", given)
    # the patch takes the same override, and emokern.ArchSpec is this class
    assert emokern.ArchSpec is ArchSpec
    with emokern.patch(model, tiny_bank(model), arch=given, force=True, sites=("mlp",)) as handle:
        assert handle.site_names == [f"layer{i}.mlp" for i in range(LAYERS)]


@pytest.mark.parametrize("layers, want", [
    (None, [0, 1, 2, 3, 4]), (2, [2]), (-1, [4]), (0.5, [2]), (1.0, [4]), (0.0, [0]), (slice(1, None, 2), [1, 3]),
    ([3, -5, 0.25, 3], [0, 1, 3]),
])
def test_select_layers(layers, want):
    assert select_layers(layers, 5) == want


@pytest.mark.parametrize("layers, error, match", [
    (5, ValueError, "out of range for a model with 5 layers"), (-6, ValueError, "out of range"),
    (1.5, ValueError, r"fraction of depth in \[0, 1\]"), (True, TypeError, "got True"), ("2", TypeError, "got str"),
    (slice(4, 1), ValueError, "is empty"), ([], ValueError, "is empty"),
])
def test_select_layers_refuses(layers, error, match):
    with pytest.raises(error, match=match):
        select_layers(layers, 5)


def _nest(path: str, leaf):
    """An object whose dotted attribute ``path`` leads to ``leaf``."""
    root = obj = types.SimpleNamespace()
    parts = path.split(".")
    for part in parts[:-1]:
        setattr(obj, part, types.SimpleNamespace())
        obj = getattr(obj, part)
    setattr(obj, parts[-1], leaf)
    return root


@pytest.mark.parametrize("path", arch.VLLM_LAYER_PATHS)
def test_vllm_layer_paths(path):
    layers = torch.nn.ModuleList([torch.nn.Identity()])
    assert find_decoder_layers(_nest(path, layers)) is layers


def test_vllm_layer_paths_skip_what_is_not_a_module_list_and_name_the_paths_when_none_fits():
    layers = torch.nn.ModuleList([torch.nn.Identity()])
    model = _nest("language_model.model.layers", layers)
    model.model = types.SimpleNamespace(layers=[torch.nn.Identity()])  # a plain list at the first path
    assert find_decoder_layers(model) is layers
    with pytest.raises(RuntimeError, match="SimpleNamespace.*model.layers, language_model.model.layers"):
        find_decoder_layers(types.SimpleNamespace(decoder=layers))


def test_layer_list_of_length_and_text_config():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Identity()] * 2),
                                torch.nn.ModuleList([torch.nn.Identity()] * 3),
                                torch.nn.ModuleList([torch.nn.Identity()] * 3))
    assert layer_list_of_length(model, 3) is model[1]  # the first in named_modules order
    assert layer_list_of_length(model, 4) is None
    assert layer_list_of_length(model, 0) is None and layer_list_of_length(model, None) is None
    inner = types.SimpleNamespace(hidden_size=8)
    assert text_config(types.SimpleNamespace(get_text_config=lambda: inner, hidden_size=99)) is inner
    plain = types.SimpleNamespace(hidden_size=8)
    assert text_config(plain) is plain
