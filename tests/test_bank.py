"""VectorBank files: round trip, checksum verification, model refusal, malformed input."""

import json

import pytest
import torch

from emokern.core.bank import BankFileError, BankMismatchError, VectorBank, bank_paths
from emokern.testing.families import LAYERS, tiny_bank, tiny_model


def test_round_trip_keeps_everything(tmp_path):
    model = tiny_model("qwen2")
    bank = tiny_bank(model)
    bank.neutral_mean = torch.randn(LAYERS, 6)
    bank.neutral_std = torch.rand(LAYERS, 6) + 0.5
    bank.metadata = {"recipe": {"first_token": 50}}
    bank.extra = {"raw_vectors": torch.randn(LAYERS, 6, 32)}
    meta_path = bank.save(tmp_path / "b")
    assert meta_path == tmp_path / "b.json" and (tmp_path / "b.safetensors").is_file()
    for spelling in ("b", "b.json", "b.safetensors"):
        loaded = VectorBank.load(tmp_path / spelling, model=model)
        assert torch.equal(loaded.vectors, bank.vectors) and loaded.names == bank.names
        assert torch.equal(loaded.neutral_std, bank.neutral_std) and loaded.metadata == bank.metadata
        assert loaded.fingerprint == bank.fingerprint and loaded.layers == bank.layers
        assert torch.equal(loaded.extra["raw_vectors"], bank.extra["raw_vectors"])


def test_corruption_is_detected(tmp_path):
    bank = tiny_bank(tiny_model("llama"))
    bank.save(tmp_path / "b")
    tensors, _ = bank_paths(tmp_path / "b")
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(BankFileError, match="corrupted or were changed: SHA-256"):
        VectorBank.load(tmp_path / "b")


def test_wrong_model_is_refused_on_load(tmp_path):
    bank = tiny_bank(tiny_model("llama"))
    bank.save(tmp_path / "b")
    with pytest.raises(BankMismatchError, match="fingerprint"):
        VectorBank.load(tmp_path / "b", model=tiny_model("llama", seed=3))
    VectorBank.load(tmp_path / "b", model=tiny_model("llama", seed=3), force=True)


def test_malformed_files(tmp_path):
    with pytest.raises(BankFileError, match="does not exist"):
        VectorBank.load(tmp_path / "missing")
    bank = tiny_bank(tiny_model("llama"))
    bank.save(tmp_path / "b")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(BankFileError, match="not valid JSON"):
        VectorBank.load(tmp_path / "b")
    (tmp_path / "b.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(BankFileError, match="not an emokern VectorBank file"):
        VectorBank.load(tmp_path / "b")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(vectors=torch.randn(2, 3)), r"shape \(L, K, d\)"),
        (dict(names=["a", "b"]), r"one name per vector \(K = 3\)"),
        (dict(names=["a", "a", "b"]), r"unique; duplicated: \['a'\]"),
        (dict(layers=[0, 0]), r"distinct layer indices"),
        (dict(residual_norm=torch.zeros(2)), r"positive"),
        (dict(vectors=torch.full((2, 3, 4), float("nan"))), r"NaN or Inf"),
        (dict(neutral_std=torch.ones(3, 3)), r"'neutral_std' must have shape \(L, K\) = \(2, 3\)"),
    ],
)
def test_invalid_banks(kwargs, pattern):
    args = dict(vectors=torch.randn(2, 3, 4), names=["a", "b", "c"], layers=[0, 1], residual_norm=torch.ones(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        VectorBank(**args)


def test_unknown_emotion_lists_close_matches():
    bank = VectorBank(torch.randn(1, 3, 4), ["desperate", "calm", "despondent"], [0], torch.ones(1))
    with pytest.raises(KeyError, match="did you mean 'desperate'"):
        bank.index("desprate")


def test_default_layer_rules():
    vectors = torch.randn(4, 2, 8)
    bank = VectorBank.from_tensors(vectors, ["a", "b"], layers=[3, 6, 9, 12], residual_norm=torch.ones(4))
    assert bank.default_layer() == (9, "two thirds of the bank's layers")
    bank.metadata["default_layer"] = {"chosen": 12, "two_thirds": 9, "rule": "validation"}
    assert bank.default_layer() == (12, "bank.metadata['default_layer']['chosen']")
    bank.metadata["default_layer"] = {"chosen": None, "two_thirds": 6}
    assert bank.default_layer() == (6, "bank.metadata['default_layer']['two_thirds']")
    bank.metadata["default_layer"] = {"chosen": 5, "two_thirds": 7}  # neither is a bank layer: skipped
    assert bank.default_layer() == (9, "two thirds of the bank's layers")
    bank.metadata["default_layer"] = 3
    assert bank.default_layer() == (3, "bank.metadata['default_layer']")
