"""Sections 5-7 of the report (``emokern.validation.concept_checks``): the shipped data files, their refusal of malformed input, the
scoring on planted activations, and the three sections end to end on a tiny random Llama with a word-level
tokenizer, where a bank whose vectors are the unembedding rows of the emotion words must rank every steered word
first (and a shuffled one never)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

import emokern  # noqa: E402
from emokern.extraction.emotion_words import find_emotion_word  # noqa: E402
from emokern.core.emotions import EMOTIONS  # noqa: E402
from emokern.util.input_files import InputFileError  # noqa: E402
from emokern.validation.concept_checks import (  # noqa: E402
    SCENARIO_TOP,
    STEERING_STRENGTHS,
    STEERING_TOP,
    intensity_scores,
    key_numbers,
    scenario_ranks,
    summary_line,
    concept_check_sections,
)
from emokern.testing.words import vocab_of, word_tokenizer  # noqa: E402
from emokern.validation.concept_checks_page import concept_checks_html  # noqa: E402
from emokern.validation.concept_data import load_intensity, load_sanity_prompts, load_scenarios  # noqa: E402

HIDDEN, LAYERS = 32, 4


# ---------------------------------------------------------------------------------------------------- data files


def test_packaged_scenarios():
    scenarios = load_scenarios()
    emotions = sorted({s.emotion for s in scenarios})
    assert len(scenarios) >= 36 and len(emotions) >= 18
    assert all(sum(s.emotion == e for s in scenarios) == 2 for e in emotions)
    # spread over valence: both signs well represented (the shipped norms say which is which)
    from emokern.core.emotions import load_norms

    valence = {n.word: n.valence for n in load_norms()}
    rated = [valence[e] for e in emotions if e in valence]
    assert sum(v > 5 for v in rated) >= 5 and sum(v < 5 for v in rated) >= 5
    for s in scenarios:  # implicit: no scenario names any of the scenario emotions
        named = [e for e in emotions if find_emotion_word(s.prompt, e)]
        assert not named, (s.prompt, named)


def test_packaged_intensity_and_sanity():
    templates = load_intensity()
    assert len(templates) >= 8
    for t in templates:
        assert len(t.values) >= 6 and 1 <= len(t.expected) <= 3
        prompts = t.prompts()
        assert len(set(prompts)) == len(t.values) and all("{value}" not in p for p in prompts)
    assert load_intensity()[0].prompts()[0].count("200") == 1  # integers are written without ".0"
    sanity = load_sanity_prompts()
    assert len(sanity.probes) >= 2 and sanity.leak_tokens >= 1


def _write(tmp_path: Path, obj, name="data.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


TEMPLATE = {"name": "t", "template": "I waited {value} minutes.", "values": [1, 2, 3, 4],
            "expected": {"bored": "+"}}
PROBE = {"user": "How is he?", "prefix": "He is feeling"}


@pytest.mark.parametrize("loader, data, message", [
    (load_scenarios, "{not json", "is not valid JSON"),
    (load_scenarios, [1, 2], "expected a JSON object with a 'scenarios' list; got list"),
    (load_scenarios, {"scenarios": []}, "expected 'scenarios' to be a non-empty list"),
    (load_scenarios, {"scenarios": [{"emotion": "sadd", "prompt": "x"}, {"emotion": "calm", "prompt": "y"}]},
     r"scenarios\[0\]: expected one of the 171 emotion words .*got 'sadd'; did you mean 'sad'"),
    (load_scenarios, {"scenarios": [{"emotion": "sad", "prompt": " "}, {"emotion": "calm", "prompt": "y"}]},
     r"scenarios\[0\]: 'prompt' must be a non-empty string"),
    (load_scenarios, {"scenarios": [{"emotion": "sad", "prompt": "x"}, {"emotion": "sad", "prompt": "y"}]},
     r"at least 2 distinct emotions; got \['sad'\]"),
    (load_intensity, {"templates": [{**TEMPLATE, "template": "I waited."}]},
     r"templates\[0\]: 'template' must contain \{value\} exactly once"),
    (load_intensity, {"templates": [{**TEMPLATE, "values": [1, 2, 3]}]},
     "'values' must be a list of at least 4 finite numbers; got"),
    (load_intensity, {"templates": [{**TEMPLATE, "values": [1, 3, 2, 4]}]},
     r"'values' must be strictly increasing; got \[1, 3, 2, 4\]"),
    (load_intensity, {"templates": [{**TEMPLATE, "values": [1, 2, "3", 4]}]}, "finite numbers"),
    (load_intensity, {"templates": [{**TEMPLATE, "expected": {"bored": "up"}}]},
     r"expected\['bored'\]: expected '\+' or '-'; got 'up'"),
    (load_intensity, {"templates": [{**TEMPLATE, "expected": {}}]}, "'expected' must map 1 to 3 emotions"),
    (load_intensity, {"templates": [{**TEMPLATE, "expected": {"calm": "+", "sad": "-", "happy": "+", "bored": "+"}}]},
     "'expected' must map 1 to 3 emotions"),
    (load_intensity, {"templates": [{**TEMPLATE, "expected": {"sleepyy": "+"}}]}, "got 'sleepyy'; did you mean"),
    (load_sanity_prompts, {"probes": [{"user": "How is he?"}], "leak": {"user": "x", "max_new_tokens": 8}},
     r"probes\[0\]: 'prefix' must be a non-empty string; got None"),
    (load_sanity_prompts, {"probes": [PROBE]}, r"leak: expected an object with 'user'; got NoneType"),
    (load_sanity_prompts, {"probes": [PROBE], "leak": {"user": "x", "max_new_tokens": 0}},
     r"leak: 'max_new_tokens' must be an int in \[1, 256\]; got 0"),
])
def test_malformed_files_are_refused(tmp_path, loader, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(InputFileError, match=message) as info:
        loader(path)
    assert str(path) in str(info.value)  # the error names the file


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputFileError, match=r"input file '.*nowhere\.json' does not exist"):
        load_scenarios(tmp_path / "nowhere.json")


# ---------------------------------------------------------------------------------------------------- scoring


def test_scenario_ranks_recover_planted_emotions_despite_a_shared_offset():
    g = torch.Generator().manual_seed(0)
    K, n = 12, 36
    vectors = torch.nn.functional.normalize(torch.randn(K, 64, generator=g), dim=1)
    targets = [i % K for i in range(n)]
    # every scenario carries its own emotion plus a large component along emotion 0 (raised everywhere)
    states = vectors[targets] + 3.0 * vectors[0] + 0.05 * torch.randn(n, 64, generator=g)
    scores = torch.nn.functional.normalize(states, dim=1) @ vectors.T
    ranks = scenario_ranks(scores, targets)
    assert ranks.tolist() == [1] * n
    raw = scenario_ranks(scores, targets, centre=False)
    assert (raw == 1).double().mean() < 0.2  # without centring emotion 0 wins nearly every row
    # the target column's rank counts only strictly higher scores
    assert scenario_ranks(torch.tensor([[1.0, 1.0, 0.0]]), [1], centre=False).tolist() == [1]
    assert scenario_ranks(torch.tensor([[3.0, 1.0, 2.0]]), [1], centre=False).tolist() == [3]


def test_intensity_scores_signs():
    values = [1, 2, 5, 10, 20, 50]
    up = intensity_scores(values, torch.tensor([0.1, 0.2, 0.25, 0.3, 0.5, 0.9]), +1)
    assert up["rho"] == pytest.approx(1.0) and up["right"] is True
    assert intensity_scores(values, torch.tensor([0.1, 0.2, 0.25, 0.3, 0.5, 0.9]), -1)["right"] is False
    flat = intensity_scores(values, torch.zeros(6), +1)
    assert flat["rho"] is None and flat["right"] is None and "constant" in flat["note"]


# ---------------------------------------------------------------------------------------------------- end to end


def _texts():
    words = [s.prompt for s in load_scenarios()] + [p for t in load_intensity() for p in t.prompts()]
    sanity = load_sanity_prompts()
    words += [u + " " + p for u, p in sanity.probes] + [sanity.leak_user, "Human : Assistant :"]
    return words


# the 18 scenario emotions and two more; "annoyed" (an intensity emotion) is left out on purpose
NAMES = sorted({s.emotion for s in load_scenarios()}) + ["joyful", "hopeful"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import transformers as tf

    tokenizer = word_tokenizer(vocab_of(_texts() + NAMES), pad="[PAD]")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval(), tokenizer


def _word_bank(model, tokenizer, shift: int = 0):
    """Each emotion's vector (at every layer) is the unembedding row of the word of the emotion ``shift`` places
    further in NAMES: shift 0 plants each emotion's own word."""
    W = model.get_output_embeddings().weight.detach()
    ids = [tokenizer.convert_tokens_to_ids(NAMES[(k + shift) % len(NAMES)]) for k in range(len(NAMES))]
    vectors = torch.nn.functional.normalize(W[ids], dim=1)
    return emokern.VectorBank.from_tensors(vectors.expand(LAYERS, -1, -1).clone(), NAMES, model=model,
                                           residual_norm=torch.ones(LAYERS))


@pytest.fixture(scope="module")
def sections(model_and_tokenizer, tmp_path_factory):
    model, tokenizer = model_and_tokenizer
    out = tmp_path_factory.mktemp("validation")
    bank = _word_bank(model, tokenizer)
    result = concept_check_sections(bank, model, tokenizer, out, layer=3, scenarios=load_scenarios(),
                                 templates=load_intensity(), sanity=load_sanity_prompts(), progress=False)
    return result, out, bank


def test_planted_word_directions_rank_first(sections):
    result, out, bank = sections
    steer = result["steering"]
    assert steer["layer"] == bank.two_thirds_layer() == 2
    assert steer["n_candidates"] == len(NAMES) and steer["candidates"] == NAMES
    assert steer["chance_top1"] == pytest.approx(1 / len(NAMES))
    assert steer["chance_top5"] == pytest.approx(5 / len(NAMES))
    assert steer["chance_mean_rank"] == pytest.approx((len(NAMES) + 1) / 2)
    assert [r["strength"] for r in steer["by_strength"]] == list(STEERING_STRENGTHS)
    strongest = steer["by_strength"][-1]
    assert strongest["top1"] == 1.0 and strongest["mean_rank"] == 1.0
    assert strongest["own_rise_mean"] > strongest["other_rise_mean"]
    assert set(strongest["ranks"]) == set(NAMES)
    assert steer["per_layer"]["layers"] == list(range(LAYERS)) and len(steer["per_layer"]["top1"]) == LAYERS
    leak = steer["leak"]
    scenario_emotions = sorted({s.emotion for s in load_scenarios()})
    assert leak["n"] == 18 and sorted(leak["steered_texts"]) == sorted(leak["emotions"]) == scenario_emotions
    assert 0 <= leak["steered_share_naming_own_emotion"] <= 1


def test_shuffled_word_directions_never_rank_first(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    bank = _word_bank(model, tokenizer, shift=1)
    result = concept_check_sections(bank, model, tokenizer, tmp_path, layer=3, scenarios=load_scenarios(),
                                 templates=load_intensity(), sanity=load_sanity_prompts(), strengths=[0.5],
                                 progress=False)
    row = result["steering"]["by_strength"][0]
    assert row["top1"] == 0.0 and row["mean_rank"] >= 2


def test_scenario_and_intensity_sections(sections):
    result, out, bank = sections
    s = result["scenarios"]
    K = 18
    assert s["n_scenarios"] == 36 and s["n_emotions"] == K and s["n_skipped"] == 0
    assert s["chance_top1"] == pytest.approx(1 / K) and s["chance_top3"] == pytest.approx(3 / K)
    assert s["chance_mean_rank"] == pytest.approx((K + 1) / 2)
    assert len(s["matrix"]["values"]) == 36 and all(len(row) == K for row in s["matrix"]["values"])
    column_means = torch.tensor(s["matrix"]["values"]).mean(0)
    assert torch.allclose(column_means, torch.zeros(K), atol=1e-4)  # centred per emotion
    assert 0 <= s["top1"] <= s["top3"] <= 1 and 0 < s["top1_binomial_p"] <= 1
    assert len(s["per_layer"]["top1"]) == LAYERS and s["per_layer"]["top1"][3] == s["top1"]

    i = result["intensity"]
    assert {x["emotion"] for x in i["skipped"]} == {"annoyed"}  # not in the bank
    assert i["n_pairs"] == sum(len(t.expected) for t in load_intensity()) - len(i["skipped"])
    assert i["chance_share_right"] == 0.5 and 0 <= i["share_right"] <= 1
    assert i["n_right"] == sum(bool(p["right"]) for p in i["pairs"])
    assert 0 < i["sign_test_p"] <= 1 and len(i["per_layer"]["share_right"]) == LAYERS

    for name in ("scenario_matrix.png", "intensity.png", "steering_ranks.png", "validation_layers.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert result["layers_plot"] == "validation_layers.png"


def test_html_and_summary(sections):
    result, out, bank = sections
    report = {"layer": {"index": 3}, "featured": ["happy", "calm"], "scenarios": result["scenarios"],
              "intensity": result["intensity"], "steering": result["steering"],
              "validation_layers_plot": result["layers_plot"]}
    page = concept_checks_html(report, out, scenario_top=SCENARIO_TOP, steering_top=STEERING_TOP)
    assert page.count("data:image/png;base64,") == 4
    assert f"{result['scenarios']['top1']:.3f}" in page and f"{result['intensity']['share_right']:.3f}" in page
    numbers = key_numbers(report)
    assert numbers["steering_top1_at_0.5"] == 1.0 and numbers["scenario_chance_top1"] == pytest.approx(1 / 18)
    line = summary_line(report)
    assert "chance 0.056 / 0.167" in line and "top-1 1.000" in line and "chance 0.5" in line


def test_bad_strengths_and_layer(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    bank = _word_bank(model, tokenizer)
    kwargs = dict(layer=3, scenarios=load_scenarios(), templates=load_intensity(), sanity=load_sanity_prompts(),
                  progress=False)
    with pytest.raises(ValueError, match="strengths: expected at least one finite, non-zero"):
        concept_check_sections(bank, model, tokenizer, tmp_path, strengths=[0.0], **kwargs)
    with pytest.raises(ValueError, match=r"steer_layer: expected one of the bank's layers \[0, 1, 2, 3\]; got 9"):
        concept_check_sections(bank, model, tokenizer, tmp_path, steer_layer=9, **kwargs)


def test_report_command_refuses_a_malformed_file_before_any_output(model_and_tokenizer, tmp_path, capsys):
    from emokern.cli import main

    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _word_bank(model, tokenizer).save(tmp_path / "bank")
    bad = _write(tmp_path, {"templates": [{**TEMPLATE, "values": [4, 3, 2, 1]}]}, "bad.json")
    code = main(["report", str(tmp_path / "bank"), "--model", str(tmp_path / "model"), "--intensity", str(bad),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "emokern report: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_emotion_words_are_real():
    assert set(NAMES) <= set(EMOTIONS)


def test_demo_prints_the_new_numbers_beside_the_old(sections):
    from emokern.pipeline import report_key_numbers, report_number_lines

    result, _, _ = sections
    report = {"layer": {"index": 3}, "classification": {"chance_top1": 0.05, "chance_top5": 0.25,
                                                        "quality_curve": {"top1_at_layer": 0.5}},
              "scenarios": result["scenarios"], "intensity": result["intensity"], "steering": result["steering"]}
    numbers = report_key_numbers(report)
    assert numbers["held_out_top1"] == 0.5 and numbers["scenario_top1"] == result["scenarios"]["top1"]
    lines = report_number_lines(numbers, report)
    assert lines[0].startswith("layer 3: held-out story top-1 0.500 / top-5 — (0.050 / 0.250)")
    assert lines[2].startswith("implicit scenarios top-1") and "chance" in lines[2]
    assert lines[3].startswith("intensity ") and lines[4].startswith("steering own-word top-1 1.000")
