"""Held-out measurements of emotion vectors: premise splits, the quality curve, the probe ceiling, valence AUROC and
the choice of the default layer.

Every number here but :func:`held_out_accuracy`'s is measured on stories whose premise (topic) took no part in
building the vectors, so that it measures emotion, not premise, recognition; :func:`held_out_accuracy` is the
fallback for corpora with fewer than 3 premises, holding out stories::

    split = premise_split(topics, test_fraction=0.2, validation_fraction=0.2, seed=0)
    ev = evaluate(acts, labels, names, neutral, topics, layers=layer_ids, valence=norms)   # an Evaluation
    ev.layer, ev.test_top5[ev.layer_slot], ev.probe_top1, ev.valence_auroc

The three parts of a split are disjoint sets of whole premises: **test** (about ``test_fraction`` of them),
**validation** (about ``validation_fraction`` of the rest) and **train** (what is left). The default layer is chosen on
validation (vectors from train only); the reported test numbers use vectors from train + validation, at that layer.
The test set is never used to choose anything.

Measures (per layer unless said otherwise):

* **mean-difference top-1 / top-5**: vectors are built from the training rows as in
  :func:`emokern.extraction.vectors.emotion_vectors` (denoised, unit); a held-out story ``a`` scores ``v_k · (a − c)`` for each
  emotion, with ``c`` the equal-weight mean of the held-out emotions' mean activations (the recipe's "subtract the
  mean over emotions", applied to the held-out set so that what its stories share, their premises, favours no
  emotion); top-k is whether the story's own emotion is among the k highest. Chance: 1/K and min(5, K)/K.
* **probe top-1** (the linear-readout ceiling): a multinomial logistic regression (scikit-learn, L2, ``C``) on the
  standardised training activations, scored on the held-out ones at the chosen layer (and at the layers asked for).
* **valence AUROC**: the direction ``mean(positive stories) − mean(negative stories)`` of the training rows, where an
  emotion is positive when its human valence is at least ``positive_at`` and negative when at most ``negative_at``
  (the packaged Glasgow norms, 1–9 scale); held-out stories of positive vs negative emotions are scored by their
  projection on it. Chance 0.5.
* **layer choice**: the layer maximising ``top-1 + top-5`` on validation, smoothed over each layer and its two
  neighbours (a three-layer moving mean, the end layers repeated, so that one lucky layer does not win); ties go
  to the deeper layer.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from emokern.core.emotions import load_norms
from emokern.extraction.vectors import check_activations, emotion_membership, emotion_vectors

__all__ = [
    "CrossValidation",
    "Evaluation",
    "PremiseSplit",
    "QualityCurve",
    "choose_layer",
    "cross_validate",
    "evaluate",
    "held_out_accuracy",
    "mean_difference_accuracy",
    "premise_split",
    "probe_accuracy",
    "valence_auroc",
    "valence_signs",
]

#: Valence thresholds on the Glasgow norms' 1-9 scale (FIDELITY_NOTES: >= 6 positive, <= 4 negative).
POSITIVE_AT = 6.0
NEGATIVE_AT = 4.0


@dataclasses.dataclass(frozen=True)
class PremiseSplit:
    """Row indices (int64 tensors) of the three disjoint parts of a split, and the premises (group ids) of each."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    groups: Dict[str, List[str]]


def premise_split(groups: Sequence, *, test_fraction: float = 0.2, validation_fraction: float = 0.2,
                  seed: int = 0) -> PremiseSplit:
    """Split rows by whole groups (premises): a seeded permutation of the distinct group ids (as strings, sorted
    first) is cut into ``max(1, int(test_fraction · G))`` test groups, then ``max(1, int(validation_fraction ·
    (G − n_test)))`` validation groups (none when ``validation_fraction`` is 0), and the rest for training.

    Raises ``ValueError`` when fewer than 2 groups (3 with a validation part) exist or a fraction is outside [0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a fraction in (0, 1); got {test_fraction}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: expected a fraction in [0, 1); got {validation_fraction}")
    ids = sorted({str(g) for g in groups})
    need = 3 if validation_fraction > 0 else 2
    if len(ids) < need:
        raise ValueError(f"groups: a premise split with{'' if need == 3 else 'out'} a validation part needs at least "
                         f"{need} distinct premises; got {len(ids)}")
    g = torch.Generator().manual_seed(int(seed))
    order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
    n_test = max(1, int(test_fraction * len(ids)))
    rest = len(ids) - n_test
    n_val = 0 if validation_fraction == 0 else min(rest - 1, max(1, int(validation_fraction * rest)))
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    where = {gid: part for part, gids in parts.items() for gid in gids}
    rows = {part: [i for i, x in enumerate(groups) if where[str(x)] == part] for part in parts}
    return PremiseSplit(train=torch.tensor(rows["train"], dtype=torch.int64),
                        validation=torch.tensor(rows["validation"], dtype=torch.int64),
                        test=torch.tensor(rows["test"], dtype=torch.int64), groups=parts)


def _label_index(labels: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    index = {n: k for k, n in enumerate(names)}
    return torch.tensor([index.get(x, -1) for x in labels], dtype=torch.int64)


def mean_difference_accuracy(acts: torch.Tensor, labels: Sequence[str], names: Sequence[str],
                             neutral_acts: torch.Tensor, train: torch.Tensor, test: torch.Tensor, *,
                             variance: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-layer held-out top-1 and top-5 accuracy of mean-difference vectors (see the module docstring).

    Args:
        acts: (n, L, d) per-story mean activations; labels: n emotion names; names: the K emotions.
        neutral_acts: (m, L, d) neutral texts for denoising (``variance`` as in :func:`emotion_vectors`).
        train, test: row indices. Test rows whose emotion has no training row, or is not in ``names``, are dropped.

    Returns:
        ``(top1, top5, n_test)``: (L,) float32 accuracies (top-5 is top-min(5, K')) over the ``n_test`` scored
        rows, with K' the number of emotions that have training rows.
    """
    member = _label_index(labels, names)
    train = train[member[train] >= 0]
    trained = sorted(set(member[train].tolist()))
    if len(trained) < 2:
        raise ValueError(f"train: expected training stories of at least 2 emotions; got {len(trained)}")
    test = test[torch.isin(member[test], torch.tensor(trained, dtype=torch.int64))]
    if len(test) == 0:
        raise ValueError("test: no held-out story has an emotion with training stories")
    train_names = [names[k] for k in trained]
    ev = emotion_vectors(acts[train.to(acts.device)], [names[k] for k in member[train].tolist()], train_names,
                         neutral_acts,
                         variance=variance)
    to_train = {k: i for i, k in enumerate(trained)}
    truth = torch.tensor([to_train[k] for k in member[test].tolist()], device=acts.device)
    test_acts = acts[test.to(acts.device)].float()
    center = torch.stack([test_acts[truth == i].mean(0) for i in truth.unique()]).mean(0)
    scores = torch.einsum("nld,lkd->nlk", test_acts - center, ev.denoised.float())
    top = scores.topk(min(5, len(trained)), dim=-1).indices
    hits = top == truth[:, None, None]
    return hits[..., 0].float().mean(0), hits.any(-1).float().mean(0), len(test)


def valence_signs(names: Sequence[str], valence: Mapping[str, float], *, positive_at: float = POSITIVE_AT,
                  negative_at: float = NEGATIVE_AT) -> Dict[str, int]:
    """``{emotion: +1 or -1}`` for the emotions of ``names`` with a rating in ``valence`` at or above
    ``positive_at`` (+1) or at or below ``negative_at`` (-1); the others are left out."""
    signs = {}
    for n in names:
        v = valence.get(n)
        if v is not None and v >= positive_at:
            signs[n] = 1
        elif v is not None and v <= negative_at:
            signs[n] = -1
    return signs


def _auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half)."""
    s = scores.double()
    pos, neg = s[positive], s[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def valence_auroc(acts: torch.Tensor, labels: Sequence[str], signs: Mapping[str, int], train: torch.Tensor,
                  test: torch.Tensor) -> torch.Tensor:
    """Per-layer AUROC of held-out positive vs negative stories on the training rows' positive-minus-negative
    direction (see the module docstring); ``signs`` from :func:`valence_signs`. (L,) float32, NaN when either side
    has no training or no test story."""
    sign = torch.tensor([signs.get(x, 0) for x in labels], dtype=torch.int64)
    tr_pos, tr_neg = train[sign[train] > 0], train[sign[train] < 0]
    te = test[sign[test] != 0]
    L = acts.shape[1]
    if len(tr_pos) == 0 or len(tr_neg) == 0 or len(te) == 0:
        return torch.full((L,), float("nan"))
    direction = acts[tr_pos].double().mean(0) - acts[tr_neg].double().mean(0)  # (L, d)
    proj = torch.einsum("nld,ld->nl", acts[te].double(), direction)
    positive = sign[te] > 0
    return torch.tensor([_auroc(proj[:, layer], positive) for layer in range(L)], dtype=torch.float32)


def probe_accuracy(train_x: torch.Tensor, train_y: Sequence, test_x: torch.Tensor, test_y: Sequence, *,
                   C: float = 0.1, max_iter: int = 300) -> float:
    """Top-1 accuracy on ``test_x`` of a multinomial logistic regression fitted to ``train_x`` (both (n, d)),
    standardised with the training mean and standard deviation: the ceiling of a linear readout at one layer."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = train_x.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit((x - mean) / std, np.asarray(list(train_y)))
    predicted = clf.predict((test_x.double().numpy() - mean) / std)
    return float((predicted == np.asarray(list(test_y))).mean())


def choose_layer(layers: Sequence[int], top1: torch.Tensor, top5: torch.Tensor) -> int:
    """The layer of highest ``top1 + top5`` after a three-layer moving mean (each layer with its neighbours in
    ``layers`` order; an end layer counts itself again in place of its missing neighbour), ties to the deeper
    layer."""
    if len(layers) == 0 or len(layers) != len(top1) or len(layers) != len(top5):
        raise ValueError(f"layers, top1, top5: expected equal, non-zero lengths; got {len(layers)}, {len(top1)}, "
                         f"{len(top5)}")
    score = (top1.double() + top5.double()).tolist()
    n = len(score)
    smooth = [(score[max(0, i - 1)] + score[i] + score[min(n - 1, i + 1)]) / 3 for i in range(n)]
    best = max(range(len(layers)), key=lambda i: (round(smooth[i], 12), i))
    return int(layers[best])


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate` returns (all per-layer lists follow ``layers``)."""

    layers: List[int]
    layer: int  # the chosen layer (validation)
    validation_top1: List[float]
    validation_top5: List[float]
    test_top1: List[float]
    test_top5: List[float]
    valence_auroc: List[float]  # test
    probe_top1: Dict[int, float]  # test, at the chosen layer and the extra probe layers
    chance_top1: float
    chance_top5: float
    n_train: int
    n_validation: int
    n_test: int
    split: Dict[str, List[str]]

    @property
    def layer_slot(self) -> int:
        return self.layers.index(self.layer)

    def at_layer(self) -> Dict[str, float]:
        """The test numbers at the chosen layer."""
        i = self.layer_slot
        return {"layer": self.layer, "top1": self.test_top1[i], "top5": self.test_top5[i],
                "valence_auroc": self.valence_auroc[i], "probe_top1": self.probe_top1.get(self.layer),
                "chance_top1": self.chance_top1, "chance_top5": self.chance_top5}

    def to_dict(self) -> Dict:
        out = dataclasses.asdict(self)
        out["probe_top1"] = {str(k): v for k, v in self.probe_top1.items()}
        return out


def evaluate(acts: torch.Tensor, labels: Sequence[str], names: Sequence[str], neutral_acts: torch.Tensor,
             groups: Sequence, *, layers: Sequence[int], valence: Optional[Mapping[str, float]] = None,
             variance: float = 0.5, test_fraction: float = 0.2, validation_fraction: float = 0.2, seed: int = 0,
             probe_layers: Sequence[int] = (), probe: bool = True) -> Evaluation:
    """The held-out measurements of a corpus's activations (see the module docstring).

    Args:
        acts: (n, L, d) per-story mean activations at ``layers`` (L model-layer indices, ascending).
        labels, names: each story's emotion; the K emotions.
        neutral_acts: (m, L, d) neutral texts (denoising).
        groups: one premise id per story.
        valence: ``{emotion: human valence, 1-9}``; default: the packaged norms (:func:`emokern.core.emotions.load_norms`).
        probe_layers: model layers where the probe is also fitted (besides the chosen one); ``probe=False``: none.
    """
    layers = [int(x) for x in layers]
    if acts.dim() != 3 or acts.shape[1] != len(layers):
        raise ValueError(f"acts: expected (n, {len(layers)}, d) for layers {layers}; got {tuple(acts.shape)}")
    if len(labels) != acts.shape[0] or len(groups) != acts.shape[0]:
        raise ValueError(f"labels, groups: expected one per story ({acts.shape[0]}); got {len(labels)}, {len(groups)}")
    if valence is None:
        valence = {n.word: n.valence for n in load_norms()}
    split = premise_split(groups, test_fraction=test_fraction, validation_fraction=validation_fraction, seed=seed)
    v1, v5, n_val = mean_difference_accuracy(acts, labels, names, neutral_acts, split.train, split.validation,
                                             variance=variance)
    layer = choose_layer(layers, v1, v5)
    fit = torch.cat([split.train, split.validation])
    t1, t5, n_test = mean_difference_accuracy(acts, labels, names, neutral_acts, fit, split.test, variance=variance)
    auroc = valence_auroc(acts, labels, valence_signs(names, valence), fit, split.test)
    probes = {}
    if probe:
        member = _label_index(labels, names)
        fit_rows, test_rows = fit[member[fit] >= 0], split.test[member[split.test] >= 0]
        for x in sorted({layer, *[int(p) for p in probe_layers if int(p) in layers]}):
            s = layers.index(x)
            probes[x] = probe_accuracy(acts[fit_rows, s], member[fit_rows].tolist(), acts[test_rows, s],
                                       member[test_rows].tolist())
    K = len(names)
    return Evaluation(layers=layers, layer=layer, validation_top1=v1.tolist(), validation_top5=v5.tolist(),
                      test_top1=t1.tolist(), test_top5=t5.tolist(), valence_auroc=auroc.tolist(), probe_top1=probes,
                      chance_top1=1 / K, chance_top5=min(5, K) / K, n_train=len(split.train),
                      n_validation=n_val, n_test=n_test, split=split.groups)


@dataclasses.dataclass
class CrossValidation:
    """What :func:`cross_validate` returns: per-layer means over folds (lists follow ``layers``)."""

    layers: List[int]
    folds: int
    top1: List[float]
    top5: List[float]
    valence_auroc: List[float]
    probe_top1: Dict[int, float]
    transfer: Dict[str, Dict[str, List[float]]]  # name -> {"top1", "top5", "valence_auroc"} per layer
    chance_top1: float
    chance_top5: float
    n_stories: int

    def to_dict(self) -> Dict:
        out = dataclasses.asdict(self)
        out["probe_top1"] = {str(k): v for k, v in self.probe_top1.items()}
        return out


def _group_folds(groups: Sequence, folds: int, seed: int) -> List[torch.Tensor]:
    ids = sorted({str(g) for g in groups})
    if len(ids) < folds:
        raise ValueError(f"folds: expected at most as many folds as premises ({len(ids)}); got {folds}")
    order = [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(int(seed))).tolist()]
    fold_of = {gid: i % folds for i, gid in enumerate(order)}
    f = torch.tensor([fold_of[str(g)] for g in groups])
    return [(f == i).nonzero().squeeze(1) for i in range(folds)]


def cross_validate(acts: torch.Tensor, labels: Sequence[str], names: Sequence[str], neutral_acts: torch.Tensor,
                   groups: Sequence, *, layers: Sequence[int], folds: int = 4,
                   valence: Optional[Mapping[str, float]] = None, variance: float = 0.5, seed: int = 0,
                   probe_layers: Sequence[int] = (),
                   transfer: Optional[Mapping[str, Tuple[torch.Tensor, Sequence[str], Sequence]]] = None
                   ) -> CrossValidation:
    """Premise-grouped k-fold cross-validation of the measures of the module docstring, for comparing corpora:
    every premise is held out once (its stories scored by vectors from the other folds' premises), and each
    per-layer number is the mean over folds (each fold centred on its own held-out emotion means).

    ``transfer``: other story sets ``{name: (acts, labels, groups)}`` (same layers) scored, fold by fold, by the
    vectors of this corpus built without the fold's premises, on that set's stories of the held-out premises: how well
    this corpus's vectors read emotion in stories written another way (e.g. ones that never name it).
    """
    layers = [int(x) for x in layers]
    if valence is None:
        valence = {n.word: n.valence for n in load_norms()}
    signs = valence_signs(names, valence)
    parts = _group_folds(groups, folds, seed)
    everything = torch.arange(acts.shape[0])
    member = _label_index(labels, names)
    sums = {"top1": [], "top5": [], "auroc": []}
    probes: Dict[int, List[float]] = {x: [] for x in probe_layers if x in layers}
    moved: Dict[str, Dict[str, list]] = {k: {"top1": [], "top5": [], "valence_auroc": []} for k in (transfer or {})}
    for test in parts:
        train = everything[~torch.isin(everything, test)]
        t1, t5, _ = mean_difference_accuracy(acts, labels, names, neutral_acts, train, test, variance=variance)
        sums["top1"].append(t1)
        sums["top5"].append(t5)
        sums["auroc"].append(valence_auroc(acts, labels, signs, train, test))
        fit, held = train[member[train] >= 0], test[member[test] >= 0]
        for x in probes:
            s = layers.index(x)
            probes[x].append(probe_accuracy(acts[fit, s], member[fit].tolist(), acts[held, s], member[held].tolist()))
        held_groups = {str(groups[i]) for i in test.tolist()}
        for name, (other, other_labels, other_groups) in (transfer or {}).items():
            both = torch.cat([acts[train], other])
            both_labels = [labels[i] for i in train.tolist()] + list(other_labels)
            rows = torch.arange(len(train))
            other_test = torch.tensor([len(train) + i for i, g in enumerate(other_groups) if str(g) in held_groups],
                                      dtype=torch.int64)
            if len(other_test) == 0:
                continue
            o1, o5, _ = mean_difference_accuracy(both, both_labels, names, neutral_acts, rows, other_test,
                                                 variance=variance)
            moved[name]["top1"].append(o1)
            moved[name]["top5"].append(o5)
            moved[name]["valence_auroc"].append(valence_auroc(both, both_labels, signs, rows, other_test))

    def mean(xs):
        return torch.stack(xs).nanmean(0).tolist()

    K = len(names)
    return CrossValidation(
        layers=layers, folds=folds, top1=mean(sums["top1"]), top5=mean(sums["top5"]),
        valence_auroc=mean(sums["auroc"]), probe_top1={x: sum(v) / len(v) for x, v in probes.items()},
        transfer={k: {m: mean(v) for m, v in d.items()} for k, d in moved.items() if d["top1"]},
        chance_top1=1 / K, chance_top5=min(5, K) / K, n_stories=int((member >= 0).sum()))


# ----------------------------------------------------------------------------------------------------------------------
# Without premises: stories held out
# ----------------------------------------------------------------------------------------------------------------------


class QualityCurve(NamedTuple):
    """What :func:`held_out_accuracy` returns."""

    top1: torch.Tensor  # (L,) float32: fraction of test stories whose own emotion scores highest
    top5: torch.Tensor  # (L,) float32: ... is among the min(5, K) highest
    n_train: int
    n_test: int


def _story_split(member: torch.Tensor, K: int, test_fraction: float, seed: int,
           groups: Optional[Sequence] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Train and test row indices.

    Without ``groups``: per emotion, a seeded permutation of its rows, the last floor(fraction·n_k) (at least 1 when
    n_k >= 2, none when n_k == 1) for testing. With ``groups`` (one id per row, e.g. the story's topic): whole
    groups are held out for every emotion — a seeded choice of groups covering about ``test_fraction`` of them, at
    least one — so that a held-out story's premise was never seen in training; emotions left with no training
    story are dropped from the test set.
    """
    g = torch.Generator().manual_seed(seed)
    if groups is not None:
        ids = sorted({str(x) for x in groups})
        if len(ids) < 2:
            raise ValueError(f"groups: holding out by group needs at least 2 groups; got {len(ids)}")
        order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        held = set(order[:max(1, int(test_fraction * len(ids)))])
        is_test = torch.tensor([str(x) in held for x in groups])
        train = (~is_test & (member >= 0)).nonzero().squeeze(1)
        trained = set(member[train].tolist())
        keep = is_test & torch.tensor([m in trained for m in member.tolist()])
        return train, keep.nonzero().squeeze(1)
    train, test = [], []
    for k in range(K):
        rows = (member == k).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_test = 0 if len(rows) < 2 else max(1, int(test_fraction * len(rows)))
        train.append(rows[:len(rows) - n_test])
        test.append(rows[len(rows) - n_test:])
    return torch.cat(train), torch.cat(test)


def held_out_accuracy(acts: torch.Tensor, labels: Sequence[str], names: Sequence[str], neutral_acts: torch.Tensor, *,
                      test_fraction: float = 0.2, variance: float = 0.5, seed: int = 0,
                      groups: Optional[Sequence] = None) -> QualityCurve:
    """Per-layer held-out emotion classification accuracy of the (denoised) vectors: the "quality curve".

    Each emotion's stories are split deterministically: after a permutation seeded by ``seed``, the last
    floor(test_fraction·n_k) rows — at least 1 if the emotion has 2 or more stories, none if it has 1 — are held
    out; with ``groups`` (e.g. topics), whole groups are held out instead (see :func:`_story_split`). Vectors are built
    from the training rows with :func:`emotion_vectors` (same ``neutral_acts`` and ``variance``); each test story
    is scored at each layer by ``denoised_k · (a − c)``, where ``c`` is the equal-weight mean of the held-out
    emotions' mean activations — the recipe's "subtract the mean over emotions", applied to the held-out set so that
    what the held-out stories share (their premises) does not favour one emotion — and classified by argmax.

    Args: as :func:`emotion_vectors`, plus ``test_fraction`` in (0, 1), ``seed`` and optional ``groups`` (one id
    per row). Rows whose label is not in ``names`` take no part.

    Returns:
        :class:`QualityCurve`: ``top1`` and ``top5`` (L,) float32 accuracies (top-5 means top-min(5, K)), and the
        numbers of training and test stories.
    """
    acts = check_activations("acts", acts)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a fraction in (0, 1); got {test_fraction}")
    names, member = emotion_membership(labels, names, acts.shape[0])
    if groups is not None and len(groups) != acts.shape[0]:
        raise ValueError(f"groups: expected one group id per story ({acts.shape[0]}); got {len(groups)}")
    train, test = _story_split(member, len(names), test_fraction, seed, groups)
    if len(test) == 0:
        raise ValueError("labels: no emotion has 2 or more stories, so none can be held out for testing")
    top1, top5, n_test = mean_difference_accuracy(acts, labels, names, neutral_acts, train, test, variance=variance)
    return QualityCurve(top1=top1.cpu(), top5=top5.cpu(), n_train=len(train), n_test=n_test)
