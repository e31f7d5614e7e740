"""``emokern.validation.report.validation_report`` on a tiny random Llama with a word-level tokenizer and a planted bank.

The bank's vectors are planted so that one direction carries the human valence of the emotions (from the shipped
norms) and another their arousal; the report must recover r(PC1, valence) > 0.9 with PC1 pointing to positive
valence, whichever sign the PCA happens to return.
"""

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import emokern  # noqa: E402
from emokern.core.bank import BankMismatchError  # noqa: E402
from emokern.core.emotions import load_emotions, load_norms  # noqa: E402
from emokern.util.data_files import DataFileMissingError  # noqa: E402
from emokern.validation.datasets import load_emobank, load_goemotions  # noqa: E402
from emokern.validation.report import (  # noqa: E402
    GOEMOTIONS_TO_EMOTION,
    GOEMOTIONS_UNMAPPED,
    MIN_EMOTIONS,
    validation_report,
)
from emokern.testing.words import vocab_of, word_tokenizer  # noqa: E402

DATA = Path(str(files("emokern").joinpath("data")))
HIDDEN, LAYERS = 32, 3
N_TEXTS = 50
# 20 real emotion words, all rated in the norms: the paper's featured 12 and GoEmotions counterparts.
NAMES = ["happy", "inspired", "loving", "proud", "calm", "desperate", "angry", "guilty", "sad", "afraid", "nervous",
         "surprised", "joyful", "grateful", "excited", "amused", "annoyed", "optimistic", "relaxed", "bored"]
STORIES = [("what a wonderful day , i am so glad", "happy"), ("the night is dark and i am scared", "afraid"),
           ("she cried alone in the empty room", "sad"), ("he shouted and hit the table", "angry")]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import transformers as tf

    texts = [x.text for x in load_goemotions()[:N_TEXTS]] + [x.text for x in load_emobank()[:N_TEXTS]]
    tokenizer = word_tokenizer(vocab_of(texts + [s for s, _ in STORIES]), pad="[PAD]")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg).eval(), tokenizer


def _planted_bank(model, names=NAMES, sign=1.0, **kwargs):
    """Unit vectors = sign·valence·e1 + arousal·e2 + small noise (z-scored norms), the same at every layer."""
    norms = {n.word: n for n in load_norms()}
    g = torch.Generator().manual_seed(3)
    e1, e2 = torch.linalg.qr(torch.randn(HIDDEN, 2, generator=g)).Q.T
    val = torch.tensor([norms[n].valence if n in norms else 5.0 for n in names])
    aro = torch.tensor([norms[n].arousal if n in norms else 5.0 for n in names])
    val, aro = (val - val.mean()) / val.std(), (aro - aro.mean()) / aro.std()
    v = sign * 3 * val[:, None] * e1 + 1.5 * aro[:, None] * e2 + 0.3 * torch.randn(len(names), HIDDEN, generator=g)
    v = v / v.norm(dim=1, keepdim=True)
    return emokern.VectorBank.from_tensors(v.expand(LAYERS, -1, -1).clone(), names, model=model, **kwargs)


def _metadata():
    return {"default_layer": {"two_thirds": 1, "best_accuracy": 2},
            "recipe": {"fmt": "raw", "first_token": 50},
            "quality": {"layers": [0, 1, 2], "top1": [0.2, 0.5, 0.6], "top5": [0.5, 0.8, 0.9],
                        "n_train": 80, "n_test": 20}}


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.fixture(scope="module")
def report(model_and_tokenizer, tmp_path_factory):
    model, tokenizer = model_and_tokenizer
    bank = _planted_bank(model, metadata=_metadata(), extra={"center": torch.zeros(LAYERS, HIDDEN)})
    out = tmp_path_factory.mktemp("report")
    result = validation_report(bank, model, tokenizer, out, corpus=([s for s, _ in STORIES], [e for _, e in STORIES]),
                               goemotions_limit=N_TEXTS, emobank_limit=N_TEXTS, progress=False)
    return result, out


def test_mapping_targets_are_emotion_words():
    words = set(load_emotions())
    assert set(GOEMOTIONS_TO_EMOTION.values()) <= words
    labels = (DATA / "goemotions" / "emotions.txt").read_text().split()
    assert set(GOEMOTIONS_TO_EMOTION) | set(GOEMOTIONS_UNMAPPED) == set(labels)
    assert not set(GOEMOTIONS_TO_EMOTION) & set(GOEMOTIONS_UNMAPPED)


def test_files_and_json(report):
    result, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["geometry"]["pc1_valence"] == result["geometry"]["pc1_valence"]
    assert set(result) >= {"bank", "layer", "classification", "geometry", "logit_lens", "goemotions", "emobank"}
    assert result["files"]["plots"] == ["quality_curve.png", "pca_scatter.png", "cosine_matrix.png",
                                        "goemotions_auroc.png", "emobank_valence.png", "scenario_matrix.png",
                                        "intensity.png", "steering_ranks.png", "validation_layers.png"]
    assert set(result) >= {"scenarios", "intensity", "steering"}
    for name in result["files"]["plots"]:
        _check_png(out / name)
    assert result["layer"]["index"] == 1  # the bank's default_layer["two_thirds"]


def test_sections_in_range(report):
    result, _ = report
    K = len(NAMES)
    c = result["classification"]
    assert c["chance_top1"] == pytest.approx(1 / K) and c["chance_top5"] == pytest.approx(5 / K)
    assert c["quality_curve"]["top1_at_layer"] == 0.5
    assert c["corpus"]["n"] == len(STORIES) and 0 <= c["corpus"]["top1"] <= c["corpus"]["top5"] <= 1
    assert c["corpus"]["fmt"] == "raw" and c["corpus"]["centering"].startswith("the bank's extra['center']")

    g = result["geometry"]
    assert 0 < g["variance_explained"]["pc2"] <= g["variance_explained"]["pc1"] <= 1
    assert g["pc1_valence"]["n"] == K and g["oriented"]
    for key in ("pc1_valence", "pc2_arousal", "pc1_valence_strict", "pc2_arousal_strict"):
        assert 0 <= g[key]["r"] <= 1  # oriented: r >= 0 by construction
    assert sum(cl["size"] for cl in g["clusters"]) == K and len(g["clusters"]) == 10
    assert sorted(g["cosine"]["order"]) == sorted(NAMES)
    matrix = torch.tensor(g["cosine"]["matrix"])
    assert matrix.shape == (K, K) and torch.allclose(matrix.diagonal(), torch.ones(K), atol=1e-3)

    lens = result["logit_lens"]["emotions"]
    assert set(lens) == set(NAMES)
    for row in lens.values():
        assert len(row["promoted"]) == len(row["suppressed"]) == 10
        assert row["promoted"][0]["logit"] >= row["promoted"][-1]["logit"] > row["suppressed"][-1]["logit"]

    ge = result["goemotions"]
    assert ge["n_texts"] == N_TEXTS and ge["n_scored"] >= 5
    for label, row in ge["labels"].items():
        assert row["auroc"] is None or 0 <= row["auroc"] <= 1
        if GOEMOTIONS_TO_EMOTION[label] not in NAMES:
            assert row["auroc"] is None and row["note"] == "emotion not in the bank"
    assert ge["labels"]["amusement"]["auroc"] is not None  # 6 positives among the first 50
    assert set(ge["top_snippets"]) == set(result["featured"]) and len(result["featured"]) == 12
    for rows in ge["top_snippets"].values():
        scores = [r["score"] for r in rows]
        assert len(rows) == 5 and scores == sorted(scores, reverse=True)

    eb = result["emobank"]
    assert eb["n"] == N_TEXTS and -1 <= eb["r"] <= 1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_planted_valence_is_recovered_and_oriented(model_and_tokenizer, tmp_path, sign):
    model, tokenizer = model_and_tokenizer
    # A StoryCorpus-like object (.stories of records with .text and .emotion), one story not in the bank.
    corpus = SimpleNamespace(stories=[SimpleNamespace(text=t, emotion=e) for t, e in STORIES + [("x", "wistful")]])
    bank = _planted_bank(model, sign=sign, metadata={"recipe": {"fmt": "raw", "first_token": 50}})
    result = validation_report(bank, model, tokenizer, tmp_path, corpus=corpus,
                               goemotions_limit=8, emobank_limit=8, progress=False)
    g = result["geometry"]
    assert g["pc1_valence"]["r"] > 0.9
    assert g["pc2_arousal"]["r"] > 0.5
    pc1 = {row["name"]: row["pc1"] for row in g["emotions"]}
    assert pc1["happy"] > 0 > pc1["desperate"]  # PC1 points to positive valence whatever the planted sign
    assert g["clusters"][0]["mean_pc1"] > g["clusters"][-1]["mean_pc1"]
    # No quality curve or default layer in the metadata: the layer is the one nearest round(2/3 * (3 - 1)) = 1.
    assert result["classification"]["quality_curve"] is None and result["layer"]["index"] == 1
    assert result["classification"]["corpus"]["n_excluded"] == 1
    assert result["classification"]["corpus"]["centering"].startswith("the mean over the corpus texts")


def test_html_is_self_contained_and_shows_the_numbers(report):
    result, out = report
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert not re.search(r"url\(|@import|<script|<link", page)
    assert page.count("data:image/png;base64,") == len(result["files"]["plots"])
    g, ge = result["geometry"], result["goemotions"]
    for x in (g["pc1_valence"]["r"], g["pc2_arousal"]["r"], g["variance_explained"]["pc1"],
              g["variance_explained"]["pc2"], ge["mean_auroc"], ge["labels"]["amusement"]["auroc"],
              result["emobank"]["r"], result["classification"]["corpus"]["top1"]):
        assert f"{x:.3f}" in page
    for emotion in result["featured"]:
        assert f"<h4>{emotion}</h4>" in page


def test_too_few_emotions(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    bank = _planted_bank(model, names=NAMES[:MIN_EMOTIONS - 1])
    with pytest.raises(ValueError, match=rf"at least {MIN_EMOTIONS} emotions .*got {MIN_EMOTIONS - 1}"):
        validation_report(bank, model, tokenizer, tmp_path, progress=False)


def test_bad_layer(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    bank = _planted_bank(model)
    with pytest.raises(ValueError, match=r"layer: expected a decoder-layer index in \[0, 3\).*got 7"):
        validation_report(bank, model, tokenizer, tmp_path, layer=7, progress=False)
    partial = emokern.VectorBank(vectors=bank.vectors[:2], names=bank.names, layers=[0, 2],
                                 residual_norm=torch.ones(2), fingerprint=bank.fingerprint)
    with pytest.raises(ValueError, match=r"layer: expected one of the bank's layers \[0, 2\]; got 1"):
        validation_report(partial, model, tokenizer, tmp_path, layer=1, progress=False)


def test_bad_arguments_and_other_model(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    bank = _planted_bank(model)
    with pytest.raises(ValueError, match="goemotions_limit: expected a positive int"):
        validation_report(bank, model, tokenizer, tmp_path, goemotions_limit=0, progress=False)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1; got 0"):
        validation_report(bank, model, tokenizer, tmp_path, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="corpus: expected stories labelled with the bank's emotions"):
        validation_report(bank, model, tokenizer, tmp_path, corpus=(["a story"], ["wistful"]), progress=False)
    with pytest.raises(ValueError, match="corpus: expected one label per text; got 1 texts and 2 labels"):
        validation_report(bank, model, tokenizer, tmp_path, corpus=(["a story"], ["sad", "happy"]), progress=False)
    other = emokern.VectorBank(vectors=bank.vectors, names=bank.names, layers=bank.layers,
                               residual_norm=bank.residual_norm, fingerprint="0" * 16)
    with pytest.raises(BankMismatchError):
        validation_report(other, model, tokenizer, tmp_path, progress=False)


def test_missing_data_file(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    data = tmp_path / "data"
    shutil.copytree(DATA, data, ignore=shutil.ignore_patterns("emobank.csv"))
    with pytest.raises(DataFileMissingError, match=r"emobank\.csv does not exist; emokern expects emobank/emobank.csv"):
        validation_report(_planted_bank(model), model, tokenizer, tmp_path / "out", data_dir=data, progress=False)
    assert not (tmp_path / "out").exists()  # checked before any output or forward pass
    with pytest.raises(DataFileMissingError, match="norms/emotion_word_norms.tsv"):
        load_norms(data_dir=tmp_path / "nowhere")


def test_loaders():
    assert len(load_norms()) == 108
    go = load_goemotions()
    assert len(go) == 5427 and all(x.labels for x in go)
    assert {len(load_emobank(s)) for s in ("dev", "test")} == {1000} and len(load_emobank(None)) == 10062
    with pytest.raises(ValueError, match="split: expected one of"):
        load_goemotions("train")


def test_command(model_and_tokenizer, tmp_path, capsys):
    from emokern.cli import main

    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _planted_bank(model).save(tmp_path / "planted")
    assert main(["report", str(tmp_path / "planted"), "--model", str(tmp_path / "model"), "--layer", "2",
                 "--limit", "6", "--batch-size", "4"]) == 0
    out = tmp_path / "planted_report"  # the default: NAME_report beside the bank
    result = json.loads((out / "report.json").read_text())
    assert result["layer"] == {"index": 2, "source": "the layer argument"} and result["goemotions"]["n_texts"] == 6
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    assert f"PC1~valence r = {result['geometry']['pc1_valence']['r']:.3f}" in printed
    assert f"implicit scenarios top-1 {result['scenarios']['top1']:.3f}" in printed
