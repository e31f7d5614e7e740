"""Held-out measurements (emokern.extraction.quality): premise splits, accuracy, valence AUROC, the probe, the layer choice."""

from __future__ import annotations

import pytest
import torch

from emokern.extraction.quality import (
    choose_layer,
    cross_validate,
    evaluate,
    mean_difference_accuracy,
    premise_split,
    probe_accuracy,
    valence_auroc,
    valence_signs,
)

NAMES = ["happy", "sad", "calm", "afraid", "proud", "ashamed"]
VALENCE = {"happy": 8.2, "sad": 2.2, "calm": 7.3, "afraid": 2.2, "proud": 7.4, "ashamed": 1.8}


def planted(signal_layers=(2,), L=4, d=24, premises=10, per=1, strength=3.0, seed=0):
    """Stories of 6 emotions on `premises` premises: a premise offset everywhere, an emotion direction only at
    `signal_layers` (strength in noise units), so that held-out accuracy is high there and at chance elsewhere."""
    g = torch.Generator().manual_seed(seed)
    emotion_dirs = torch.randn(len(NAMES), d, generator=g)
    premise_dirs = 4 * torch.randn(premises, d, generator=g)
    acts, labels, groups = [], [], []
    for p in range(premises):
        for k, name in enumerate(NAMES):
            for _ in range(per):
                x = premise_dirs[p].expand(L, d) + torch.randn(L, d, generator=g)
                for layer in signal_layers:
                    x[layer] += strength * emotion_dirs[k]
                acts.append(x)
                labels.append(name)
                groups.append(f"premise {p}")
    neutral = torch.randn(12, L, d, generator=g)
    return torch.stack(acts), labels, groups, neutral


def test_premise_split_holds_out_whole_premises_deterministically():
    groups = [f"p{i % 10}" for i in range(60)]
    split = premise_split(groups, test_fraction=0.2, validation_fraction=0.25, seed=3)
    parts = {name: {groups[i] for i in getattr(split, name).tolist()} for name in ("train", "validation", "test")}
    assert len(parts["test"]) == 2 and len(parts["validation"]) == 2 and len(parts["train"]) == 6
    assert not (parts["test"] & parts["train"]) and not (parts["test"] & parts["validation"])
    assert not (parts["validation"] & parts["train"])
    assert sorted(split.train.tolist() + split.validation.tolist() + split.test.tolist()) == list(range(60))
    assert {k: sorted(v) for k, v in split.groups.items()} == {k: sorted(v) for k, v in parts.items()}
    again = premise_split(groups, test_fraction=0.2, validation_fraction=0.25, seed=3)
    assert torch.equal(again.test, split.test) and torch.equal(again.validation, split.validation)
    other = premise_split(groups, test_fraction=0.2, validation_fraction=0.25, seed=4)
    assert set(other.groups["test"]) != set(split.groups["test"]) or set(other.groups["validation"]) != set(
        split.groups["validation"])
    no_val = premise_split(groups, test_fraction=0.3, validation_fraction=0.0)
    assert len(no_val.validation) == 0 and len(no_val.groups["test"]) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": ["a", "b"]}, "needs at least 3 distinct premises; got 2"),
    ({"groups": ["a"], "validation_fraction": 0.0}, "needs at least 2 distinct premises; got 1"),
    ({"groups": ["a", "b", "c"], "test_fraction": 0.0}, "test_fraction: expected a fraction in \\(0, 1\\); got 0.0"),
    ({"groups": ["a", "b", "c"], "validation_fraction": 1.0}, "validation_fraction: expected a fraction in"),
])
def test_premise_split_errors(kwargs, message):
    groups = kwargs.pop("groups")
    with pytest.raises(ValueError, match=message):
        premise_split(groups, **kwargs)


def test_mean_difference_accuracy_sees_the_planted_layer_only():
    acts, labels, groups, neutral = planted()
    split = premise_split(groups, test_fraction=0.3, validation_fraction=0.0)
    top1, top5, n = mean_difference_accuracy(acts, labels, NAMES, neutral, split.train, split.test, variance=0.0)
    assert n == len(split.test)
    assert top1[2] == 1.0 and top5[2] == 1.0
    # no emotion signal at the other layers; the premise offsets are cancelled by the held-out centring
    assert all(top1[i] < 0.6 for i in (0, 1, 3))


def test_mean_difference_accuracy_drops_test_rows_of_untrained_emotions():
    acts, labels, groups, neutral = planted()
    train = torch.tensor([i for i, x in enumerate(labels) if x != "sad" and groups[i] != "premise 0"])
    test = torch.tensor([i for i, x in enumerate(groups) if x == "premise 0"])
    _, _, n = mean_difference_accuracy(acts, labels, NAMES, neutral, train, test, variance=0.0)
    assert n == len(NAMES) - 1
    with pytest.raises(ValueError, match="at least 2 emotions"):
        mean_difference_accuracy(acts, labels, NAMES, neutral, torch.tensor([0]), test)


def test_valence_auroc_on_a_planted_valence_direction_and_on_noise():
    g = torch.Generator().manual_seed(1)
    signs = valence_signs(NAMES, VALENCE)
    assert signs == {"happy": 1, "sad": -1, "calm": 1, "afraid": -1, "proud": 1, "ashamed": -1}
    assert valence_signs(["happy", "bored", "unknown"], {"happy": 8.0, "bored": 5.0}) == {"happy": 1}
    labels = [NAMES[i % 6] for i in range(240)]
    direction = torch.randn(16, generator=g)
    sign = torch.tensor([signs[x] for x in labels], dtype=torch.float32)
    acts = torch.randn(240, 2, 16, generator=g)
    acts[:, 1] += 2.5 * sign[:, None] * direction  # layer 1 carries valence, layer 0 does not
    train, test = torch.arange(0, 160), torch.arange(160, 240)
    auroc = valence_auroc(acts, labels, signs, train, test)
    assert auroc[1] > 0.97 and 0.3 < auroc[0] < 0.7
    none = valence_auroc(acts, labels, {"happy": 1}, train, test)
    assert torch.isnan(none).all()


def test_probe_accuracy_reads_a_linear_signal():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(300) % 3
    x = torch.randn(300, 10, generator=g) + 5 * torch.nn.functional.one_hot(y, 10).float()
    assert probe_accuracy(x[:200], y[:200].tolist(), x[200:], y[200:].tolist()) > 0.9
    noise = torch.randn(300, 10, generator=g)
    assert probe_accuracy(noise[:200], y[:200].tolist(), noise[200:], y[200:].tolist()) < 0.6


def test_choose_layer_smooths_over_neighbours():
    layers = [0, 1, 2, 3, 4, 5]
    # one lucky layer (1) beside poor ones loses to a broad plateau (3-5)
    top1 = torch.tensor([0.1, 0.9, 0.1, 0.6, 0.8, 0.5])
    assert choose_layer(layers, top1, torch.zeros(6)) == 4
    # ties go to the deeper layer
    assert choose_layer([3, 7], torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 7
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        choose_layer([0, 1], torch.zeros(3), torch.zeros(2))


def test_evaluate_chooses_the_signal_layer_on_validation_and_reports_test_numbers():
    acts, labels, groups, neutral = planted(signal_layers=(2, 3), strength=2.5, premises=12)
    acts[:, 3] += 0.7 * torch.randn(acts[:, 3].shape, generator=torch.Generator().manual_seed(9)) * 3
    ev = evaluate(acts, labels, NAMES, neutral, groups, layers=[10, 11, 12, 13], valence=VALENCE, variance=0.0,
                  probe_layers=[10])
    assert ev.layer in (12, 13) and ev.layers == [10, 11, 12, 13]
    assert set(ev.split["test"]).isdisjoint(ev.split["validation"]) and set(ev.split["test"]).isdisjoint(
        ev.split["train"])
    assert ev.test_top1[2] > 0.9 and ev.test_top1[0] < 0.6
    assert set(ev.probe_top1) == {10, ev.layer} and ev.probe_top1[ev.layer] > 0.8
    assert ev.chance_top1 == pytest.approx(1 / 6) and ev.chance_top5 == pytest.approx(5 / 6)
    at = ev.at_layer()
    assert at["layer"] == ev.layer and at["top1"] == ev.test_top1[ev.layer_slot]
    assert ev.n_train + ev.n_validation + ev.n_test == len(labels)
    assert ev.to_dict()["probe_top1"][str(ev.layer)] == ev.probe_top1[ev.layer]


def test_evaluate_checks_shapes():
    acts, labels, groups, neutral = planted()
    with pytest.raises(ValueError, match="expected \\(n, 3, d\\)"):
        evaluate(acts, labels, NAMES, neutral, groups, layers=[0, 1, 2], valence=VALENCE)
    with pytest.raises(ValueError, match="one per story"):
        evaluate(acts, labels[:-1], NAMES, neutral, groups, layers=[0, 1, 2, 3], valence=VALENCE)


def test_cross_validate_holds_out_every_premise_and_transfers():
    acts, labels, groups, neutral = planted(premises=8)
    other, other_labels, other_groups, _ = planted(premises=8, seed=0)  # the same planted stories, another "recipe"
    cv = cross_validate(acts, labels, NAMES, neutral, groups, layers=[0, 1, 2, 3], folds=4, valence=VALENCE,
                        variance=0.0, probe_layers=[2], transfer={"copy": (other, other_labels, other_groups)})
    assert cv.top1[2] == 1.0 and cv.top1[0] < 0.6 and cv.n_stories == len(labels)
    assert cv.valence_auroc[2] > 0.9
    assert cv.probe_top1[2] > 0.9
    assert cv.transfer["copy"]["top1"][2] == 1.0
    with pytest.raises(ValueError, match="at most as many folds as premises"):
        cross_validate(acts, labels, NAMES, neutral, groups, layers=[0, 1, 2, 3], folds=9, valence=VALENCE)
