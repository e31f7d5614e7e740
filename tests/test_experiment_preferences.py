"""The activity-preferences experiment (paper §3a) on the tiny chat model with a 6-activity file: the Bradley–Terry /
Elo fit, the pair set, the logit read against a plain forward, activity token spans, span-scoped per-sequence
steering, resuming, outputs, input errors and the command line."""

import json
import math

import pytest
import torch

import emokern.experiments
from emokern.engines.hf import patch
from emokern.experiments import bradley_terry as bt
from emokern.experiments import preference_reads as reads
from emokern.experiments import preferences as pf
from emokern.experiments import run_experiment
from emokern.util.input_files import InputFileError
from emokern.testing.chat import tiny_chat_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVITIES = [
    ("bake bread for a neighbour", "Kind"),
    ("fix a typo in an essay", "Kind"),
    ("sort socks by colour", "Dull"),
    ("count floor tiles", "Dull"),
    ("steal a bicycle", "Bad"),
    ("lie to a close friend about money", "Bad"),
]
TEXTS = [t for t, _ in ACTIVITIES]


@pytest.fixture(scope="module")
def activities_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "activities.json"
    path.write_text(json.dumps({"activities": [{"text": t, "category": c} for t, c in ACTIVITIES]}))
    return str(path)


def _run(tiny, out, activities_file, **options):
    model, tok, bank = tiny
    options = {"n_steer_emotions": 4, "layers": "1,2", "probe_layers": "1,2", "batch_size": 8, **options}
    return run_experiment(pf.NAME, out=out, model=model, tokenizer=tok, bank=bank, progress=False,
                          activities=activities_file, **options)


def _comparable(result):
    return {k: v for k, v in result.items() if k not in ("seconds", "outputs")}


# -------------------- Elo

def test_bradley_terry_recovers_known_strengths():
    truth = torch.tensor([-2.0, -1.1, -0.3, 0.2, 0.9, 2.3], dtype=torch.float64)
    truth -= truth.mean()
    pairs = reads.ordered_pairs(6)
    soft = [float(torch.sigmoid(truth[a] - truth[b])) for a, b in pairs]
    theta = bt.fit_bradley_terry(6, pairs, soft, prior=0.0)
    assert torch.allclose(theta, truth, atol=1e-8)
    theta_prior = bt.fit_bradley_terry(6, pairs, soft)  # the default weak prior shrinks a little towards 0
    assert torch.allclose(theta_prior, truth, atol=0.05) and (theta_prior.abs() < truth.abs()).all()
    elo = bt.elo_from_theta(theta)
    assert sum(elo) / 6 == pytest.approx(1500.0)
    assert elo[5] - elo[0] == pytest.approx(400 / math.log(10) * float(truth[5] - truth[0]))

    hard = [1.0 if truth[a] > truth[b] else 0.0 for a, b in pairs]  # every pair decided: perfect separation
    hard_theta = bt.fit_bradley_terry(6, pairs, hard)
    assert torch.isfinite(hard_theta).all()
    assert hard_theta.argsort().tolist() == truth.argsort().tolist()
    assert (hard_theta.diff() > 0.5).all()


def test_bradley_terry_fits_noisy_outcomes_by_maximum_likelihood():
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(8, generator=g, dtype=torch.float64)
    pairs = reads.ordered_pairs(8) * 3
    outcomes = [float(torch.bernoulli(torch.sigmoid(truth[a] - truth[b]), generator=g)) for a, b in pairs]
    theta = bt.fit_bradley_terry(8, pairs, outcomes)
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    p = torch.tensor(outcomes, dtype=torch.float64)
    r = p - torch.sigmoid(theta[a] - theta[b])
    grad = torch.zeros(8, dtype=torch.float64).index_add_(0, a, r).index_add_(0, b, -r) - bt.BT_PRIOR * theta
    assert grad.abs().max() < 1e-8  # a stationary point of the (concave) penalised likelihood
    assert torch.corrcoef(torch.stack([theta, truth]))[0, 1] > 0.8


def test_bradley_terry_rejects_bad_outcomes():
    with pytest.raises(ValueError, match="outcomes must lie in"):
        bt.fit_bradley_terry(3, [(0, 1)], [1.5])
    with pytest.raises(ValueError, match="2 pairs but 1 outcomes"):
        bt.fit_bradley_terry(3, [(0, 1), (1, 2)], [1.0])


# -------------------- pairs and split

def test_ordered_pairs_are_each_present_once():
    pairs = reads.ordered_pairs(6)
    assert len(pairs) == 30 == len(set(pairs))
    assert all(a != b and 0 <= a < 6 and 0 <= b < 6 for a, b in pairs)


def test_split_is_stratified_and_seeded():
    acts = [pf.Activity(f"activity {i}", f"c{i % 3}") for i in range(12)]
    split = pf.split_activities(acts, 0)
    assert split == pf.split_activities(acts, 0)
    for c in ("c0", "c1", "c2"):
        assert sum(s for s, a in zip(split, acts) if a.category == c) == 2
    assert any(pf.split_activities(acts, seed) != split for seed in range(1, 6))
    odd = [pf.Activity(f"activity {i}", f"c{i % 2}") for i in range(6)]  # two categories of 3
    assert sum(pf.split_activities(odd, 0)) == 3


def test_rerun_pairs_modes():
    steered = [True, False, True, False, True, False]
    everything, none_left = pf.rerun_pairs(steered, "all")
    assert set(everything) == {(a, b) for a, b in reads.ordered_pairs(6) if steered[a] or steered[b]} and not none_left
    cross, none_left = pf.rerun_pairs(steered, "cross")
    assert set(cross) == {(a, b) for a, b in reads.ordered_pairs(6) if steered[a] != steered[b]} and not none_left
    one, left_out = pf.rerun_pairs(steered, "cross_one_order")
    assert len(one) == len(cross) // 2 and set(one) | left_out == set(cross) and not set(one) & left_out
    assert all((b, a) in left_out for a, b in one)
    for i in range(6):  # every activity is (A) in half of its cross pairs
        as_a = sum(a == i for a, b in one)
        assert as_a * 2 in (3 - 1, 3, 3 + 1) and as_a + sum(b == i for a, b in one) == 3
    with pytest.raises(ValueError, match="steered_pairs"):
        pf.rerun_pairs(steered, "some")


def test_choose_emotions_anchors_then_both_ends():
    corr = {"blissful": 0.1, "hostile": -0.2, "a": 0.9, "b": 0.5, "c": 0.0, "d": -0.4, "e": -0.8, "f": None}
    assert pf.choose_emotions(corr, 5) == ["blissful", "hostile", "a", "e", "b"]
    assert pf.choose_emotions(corr, 1) == ["blissful"]
    assert len(pf.choose_emotions(corr, 50)) == 7  # f has no correlation
    with pytest.raises(ValueError, match="n_steer_emotions"):
        pf.choose_emotions(corr, 0)


# -------------------- prompts, read, steering

def test_spans_cover_exactly_the_activity_tokens(tiny):
    _, tok, _ = tiny
    prompts = reads.PairPrompts(tok, TEXTS)
    for a, b in reads.ordered_pairs(len(TEXTS)):
        ids = prompts.ids(a, b)
        assert ids == tok(prompts.text(a, b), add_special_tokens=False)["input_ids"]
        assert prompts.text(a, b).endswith(f"Would you prefer to (A) {TEXTS[a]} or (B) {TEXTS[b]}?<eos><|assistant|>(")
        for (s, e), text in zip(prompts.spans(a, b), (TEXTS[a], TEXTS[b])):
            assert ids[s:e] == tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids[s:e]) == text
        assert ids[:len(prompts.prefix)] == prompts.prefix
        assert len(prompts.prefix) <= prompts.spans(a, b)[0][0]
    assert prompts.answer_ids == tuple(tok.convert_tokens_to_ids(["A", "B"]))


def test_logit_read_matches_a_single_unpadded_forward(tiny):
    model, tok, _ = tiny
    prompts = reads.PairPrompts(tok, TEXTS)
    pairs = [(0, 5), (5, 0), (2, 3), (4, 1), (1, 2)]  # different lengths: left padding inside the batch
    assert len({len(prompts.ids(*ab)) for ab in pairs}) > 2
    diffs, mass = reads.score_pairs(model, prompts, pairs)
    A, B = prompts.answer_ids
    for ab, d, m in zip(pairs, diffs, mass):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts.ids(*ab)])).logits[0, -1].float()
        assert d == pytest.approx(float(logits[A] - logits[B]), abs=1e-5)
        assert m == pytest.approx(float(logits.softmax(-1)[[A, B]].sum()), abs=1e-5)


def test_steering_only_moves_rows_with_a_steered_activity(tiny):
    model, tok, bank = tiny
    prompts = reads.PairPrompts(tok, TEXTS)
    steered = [True, False, False, True, False, False]
    pairs = [(1, 2), (0, 1), (2, 4), (1, 3), (5, 2), (3, 0), (4, 5)]
    touched = [steered[a] or steered[b] for a, b in pairs]
    base, _ = reads.score_pairs(model, prompts, pairs)
    with patch(model, bank, tokenizer=tok, layers=[1, 2], monitor=False) as handle:
        moved, _ = reads.score_pairs(model, prompts, pairs, handle=handle, steer={"blissful": 0.5}, steered=steered,
                                  layers=[1, 2])
        assert not handle.state.steering  # settings cleared afterwards
    for t, x, y in zip(touched, base, moved):
        assert (x != y) if t else (x == y)  # untouched rows bit-identical: reusing the baseline is exact


def test_steering_is_scoped_to_the_activity_tokens(tiny):
    """Steering an activity equals adding the vector by hand at its token positions (and nowhere else)."""
    model, tok, bank = tiny
    prompts = reads.PairPrompts(tok, TEXTS)
    pair, layer, strength = (2, 4), 1, 0.5
    steered = [False, False, False, False, True, False]
    with patch(model, bank, tokenizer=tok, layers=[layer], monitor=False) as handle:
        (moved,), _ = reads.score_pairs(model, prompts, [pair], handle=handle, steer={"hostile": strength},
                                     steered=steered, layers=[layer])
    s, e = prompts.spans(*pair)[1]
    v = bank.vector("hostile", layer)
    add = strength * float(bank.residual_norm[bank.layer_slot(layer)]) * v / v.norm()

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h[:, s:e] += add
        return output

    remove = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts.ids(*pair)])).logits[0, -1]
    finally:
        remove.remove()
    A, B = prompts.answer_ids
    assert moved == pytest.approx(float(logits[A] - logits[B]), abs=1e-4)


def test_answers_that_are_not_single_tokens_are_refused(tiny):
    # "(A" and "(B" merged into one token each, as some tokenizers do
    tok = tiny_chat_tokenizer(extra_tokens=["(A", "(B"], merges=[("(", "A"), ("(", "B")])
    assert tok("(A", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("(A")]
    with pytest.raises(ValueError, match="'A' after '\\(' as one extra token"):
        reads.PairPrompts(tok, TEXTS)


# -------------------- whole runs

def test_run_writes_results_and_plots(tiny, activities_file, tmp_path):
    result = _run(tiny, tmp_path / "run", activities_file, steered_pairs="all", strength=2.0)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["summary"] == result["summary"]
    for name in ("elo_by_category.png", "probe_vs_elo.png", "steering_shift.png"):
        assert (tmp_path / "run" / name).stat().st_size > 1000
        assert str(tmp_path / "run" / name) in result["outputs"].values()
    assert [a["text"] for a in result["activities"]] == TEXTS
    elo = [a["elo"] for a in result["activities"]]
    assert sum(elo) / 6 == pytest.approx(1500, abs=1e-3)
    assert sorted(a["rank"] for a in result["activities"]) == list(range(1, 7))
    assert result["ranking"][0] == TEXTS[max(range(6), key=lambda i: elo[i])]
    assert set(result["categories"]) == {"Kind", "Dull", "Bad"}
    assert result["categories"]["Bad"]["mean_elo"] == pytest.approx((elo[4] + elo[5]) / 2, abs=1e-3)
    assert 0 < result["position_bias"] < 1
    matrix = result["logit_diff_matrix"]
    assert all(matrix[i][i] is None for i in range(6)) and all(matrix[0][j] is not None for j in range(1, 6))
    _, _, bank = tiny
    assert set(result["probe"]["correlations"]) == set(bank.names)
    steering = result["steering"]
    emotions = steering["emotions"]
    assert list(emotions)[:2] == ["blissful", "hostile"] and len(emotions) == 4
    assert steering["pairs_rerun"] == 30 - 3 * 2  # all pairs but the control × control ones
    for e, row in emotions.items():
        assert row["rerun_changed"] == 1.0  # every re-run pair moved under steering
        assert row["probe_r"] == result["probe"]["correlations"][e]
        steered_idx = [i for i, a in enumerate(result["activities"]) if a["steered"]]
        assert row["shift"] == pytest.approx(sum(row["elo"][i] - elo[i] for i in steered_idx) / 3, abs=2e-3)
    assert steering["r_shift_vs_probe"] is not None


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny, activities_file, tmp_path, monkeypatch):
    whole = _run(tiny, tmp_path / "whole", activities_file)

    real = pf.score_pairs
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pf, "score_pairs", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny, tmp_path / "resumed", activities_file)
    saved = len(list((tmp_path / "resumed" / "units").glob("*.json")))
    assert saved >= 5

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pf, "score_pairs", counting)
    resumed = _run(tiny, tmp_path / "resumed", activities_file)
    assert _comparable(resumed) == _comparable(whole)
    total = len([f for f in (tmp_path / "whole" / "units").glob("pairs*.json")])
    assert counted["n"] == total - 5  # the finished units were not run again


# -------------------- input errors

@pytest.mark.parametrize("content, message", [
    ("not json", "is not valid JSON"),
    ('{"things": []}', 'missing key "activities"'),
    ('{"activities": {"text": "x"}}', '"activities" must be a list'),
    ('{"activities": [{"text": "a", "category": "c"}, {"text": "b", "category": "c"}]}', "at least 4 entries"),
    ('{"activities": [{"text": "a", "category": "c"}, {"text": "b"}, {"text": "c", "category": "c"}, '
     '{"text": "d", "category": "c"}]}', r"activities\[1\]: 'category' must be a non-empty string"),
    ('{"activities": [{"text": "a", "category": "c"}, {"text": "  ", "category": "c"}, {"text": "c", "category": "c"}, '
     '{"text": "d", "category": "c"}]}', r"activities\[1\]: 'text' must be a non-empty string"),
    ('{"activities": [{"text": "a", "category": "c"}, {"text": 7, "category": "c"}, {"text": "c", "category": "c"}, '
     '{"text": "d", "category": "c"}]}', r"activities\[1\]: 'text' must be a non-empty string; got 7"),
    ('{"activities": [{"text": "bake", "category": "c"}, {"text": "b", "category": "c"}, {"text": " Bake ", '
     '"category": "c"}, {"text": "d", "category": "c"}]}', r"activities\[2\]: duplicate text 'Bake'.*activities\[0\]"),
    ('{"activities": ["a", "b", "c", "d"]}', r"activities\[0\]: expected an object with 'text'"),
])
def test_bad_activity_files_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputFileError, match=message) as info:
        pf.load_activities(str(path))
    assert str(path) in str(info.value)


def test_missing_file_unknown_emotion_and_bad_options(tiny, activities_file, tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        pf.load_activities(str(tmp_path / "nope.json"))
    with pytest.raises(KeyError, match="'blisful' is not in this bank.*did you mean 'blissful'"):
        _run(tiny, tmp_path / "a", activities_file, steer_emotions=["blisful"])
    with pytest.raises(ValueError, match="steered_pairs: expected one of"):
        _run(tiny, tmp_path / "b", activities_file, steered_pairs="every")
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        _run(tiny, tmp_path / "c", activities_file, batch_size=0)


def test_packaged_activities_follow_the_paper_design():
    acts = pf.load_activities()
    categories = [a.category for a in acts]
    assert len(acts) == 64
    assert {c: categories.count(c) for c in set(categories)} == {c: 8 for c in (
        "Helpful", "Engaging", "Social", "Self-curiosity", "Neutral", "Aversive", "Misaligned", "Unsafe")}
    assert all(not a.text.endswith((".", "?", "!")) and a.text[0].islower() for a in acts)


# -------------------- command line

def test_cli_help_and_a_tiny_cli_run(tiny, activities_file, tmp_path, monkeypatch, capsys):
    from emokern.cli import main

    # The parser imports every registered experiment; only this one is under test here.
    monkeypatch.setattr(emokern.experiments, "EXPERIMENTS", {pf.NAME: emokern.experiments.EXPERIMENTS[pf.NAME]})
    with pytest.raises(SystemExit) as info:
        main(["experiment", "preferences", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--activities", "--layers", "--probe-layers", "--strength", "--steer-emotions", "--n-steer-emotions",
                 "--steered-pairs", "--batch-size", "--max-activities", "--split-seed"):
        assert flag in text

    model, tok, bank = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    bank.save(tmp_path / "bank.json")
    out = tmp_path / "cli"
    code = main(["experiment", "preferences", "--model", str(tmp_path / "model"), "--bank", str(tmp_path / "bank.json"),
                 "--out", str(out), "--dtype", "float32", "--no-progress", "--activities", activities_file,
                 "--layers", "2", "--probe-layers", "1,3", "--steer-emotions", "calm,sad", "--max-activities", "4",
                 "--batch-size", "5", "--steered-pairs", "cross"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["options"]["steer_emotions"] == ["calm", "sad"] and result["options"]["layers"] == "2"
    assert [a["category"] for a in result["activities"]] == ["Kind", "Kind", "Dull", "Bad"]  # round-robin, file order
    assert result["summary"]["pairs"] == 12
    assert result["steering"]["layers"] == [2] and result["probe"]["layers"] == [1, 3]
    assert list(result["steering"]["emotions"]) == ["calm", "sad"]
    assert result["steering"]["pairs_rerun"] == 8  # 2 steered x 2 control, both orders
