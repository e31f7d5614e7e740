"""Activity preferences (PAPER_NOTES §3a): which activities the model prefers, Elo scores, emotion probes on the
activities, and how steering an emotion on half of the activities moves their Elo.

**Input file** (``--activities PATH``; default: the packaged ``activities.json``, 64 activities written for emokern,
8 in each of the paper's categories Helpful, Engaging, Social, Self-curiosity, Neutral, Aversive, Misaligned,
Unsafe)::

    {"activities": [{"text": "proofread a friend's cover letter", "category": "Helpful"}, ...]}

``text`` is a verb phrase that reads right in "Would you prefer to (A) {text} or (B) {text}?"; ``category`` is any
non-empty name. At least 4 activities; texts must be unique (ignoring case and surrounding spaces).

**Preferences** (:mod:`~emokern.experiments.preference_reads`). Every ordered pair ``(a, b)`` of distinct
activities (n·(n−1) pairs: 4,032 for 64) is put to the model as the user turn "Would you prefer to (A) {a} or (B)
{b}?" of its chat template, with the assistant turn prefilled with "(". The preference is ``logit("A") − logit("B")`` at the next position (the token ids of "A" and
"B" as the tokenizer encodes them right after "(" — SmolLM2 encodes "(A" as "(" + "A"; the run stops if either is
not one token). Logits come from the final hidden state of that one position through
``model.get_output_embeddings()`` in float32 (the full-vocabulary logits only for ``answer_mass``). Batches are left
padded; all prompts share their opening tokens (system prompt, "Would you prefer to (A)"), which are run once and
reused as a KV cache, with each row's position ids counted without its padding, so a batched read equals a single
unpadded forward up to floating-point rounding.

**Elo** (:mod:`~emokern.experiments.bradley_terry`). A Bradley–Terry model ``P(a beats b) = σ(θ_a − θ_b)`` is
fitted by Newton's method in float64 (``fit_bradley_terry``) to soft outcomes ``p = σ(logit diff)`` ("Elo") and to
hard outcomes (1 if the diff is positive, 0 if negative, ½ if zero: the paper's "Hard Elo"), with a weak Gaussian
prior (``BT_PRIOR``) that keeps undefeated activities finite. Scores are ``1500 + 400/ln 10 · θ`` (mean 1500).
No position term is fitted: every pair is asked in both orders (or, under ``"cross_one_order"``, each activity is
(A) in half of its re-run pairs), so a bias towards "(A)" cancels; it is reported as ``position_bias`` (mean
``P(A) = σ(diff)`` over all pairs) and ``answered_a`` (the fraction of pairs with a positive diff).

**Probes.** Each activity is also put to the model as "How would you feel about {activity}?" (assistant turn
opened); the projection of the activity's tokens onto every bank emotion, z-scored by the bank's neutral statistics
when it has them, is averaged over those tokens and over ``probe_layers``. The Pearson r of each emotion's value with
Elo across activities gives one correlation per bank emotion (paper: blissful 0.71, hostile −0.74).

**Steering.** The activities are split, within each category (seeded by ``split_seed``), into a steered and a
control half. For each chosen emotion, ``strength`` (a fraction of the layer's mean residual norm) is added at
``layers`` only at the token positions of steered activities, in every prompt where one occurs (per sequence: a pair
prompt is steered on whichever of its two activities are steered). Pairs of two control activities are unchanged by
construction (no steered token in their prompt; the tests check that such rows of a steered batch are bit-identical
to unsteered ones), so they are not run again: their baseline outcomes are reused. ``steered_pairs`` says which
pairs are run again (:func:`rerun_pairs`):

* ``"all"`` — every pair with a steered activity, both orders (3,040 for 32 + 32);
* ``"cross"`` — steered × control pairs, both orders (2,048); pairs of two steered activities keep their baseline
  outcomes (they only order the steered activities among themselves; the shift of the steered half against the
  control half comes from the cross pairs);
* ``"cross_one_order"`` — steered × control pairs in one order each (1,024): the k-th steered and l-th control
  activity are asked with the steered one as (A) when k + l is even, so every activity is (A) in half of its cross
  pairs; the other order is left out of that condition's fit (not filled in from the baseline), and pairs of two
  steered activities keep their baseline outcomes as in ``"cross"``.

Each condition gets its own joint Bradley–Terry fit; an emotion's Elo shift is the mean over steered
activities of (steered Elo − baseline Elo). Across the steered emotions, the shift is correlated with the emotion's
probe–Elo correlation (paper: r = 0.85).

Default emotions: blissful and hostile (when in the bank) plus the most positively and most negatively
probe-correlated other emotions, half each, up to ``n_steer_emotions``.

**Default steering layers.** ``"middle"`` (the bank's layers at 40–60 % of depth, as the paper steered "middle
layers"). On SmolLM2-135M-Instruct that is layers 12–17. Measured on 192 steered × control pairs: s = 0.5 at all six
keeps the answer an "A" or "B" (``answer_mass``, P("A") + P("B") at the answer position, 0.93–0.96 against 0.945
unsteered, for blissful, hostile, happy and afraid) while moving the preferences (steered diffs correlate 0.36–0.78
with the unsteered ones); at one or two layers the same strength barely moves them (r = 0.82–0.98). So the paper's
setting is kept. ``answer_mass`` is reported per condition so that a bank or model where it collapses shows it.

**Sizes.** ``quick`` (SmolLM2 on 2 CPU cores, a few minutes): all 64 activities and all 4,032 ordered pairs for the
baseline, probes on every activity, 12 steered emotions with ``steered_pairs="cross_one_order"`` (12 × 1,024 pairs;
at about 50 pairs/s per core, both orders of the cross pairs for 12 emotions would take about 8 minutes alone).
``full``: the same baseline and probes, 35 steered emotions with ``steered_pairs="all"`` (35 × 3,040 pairs).

**Resuming.** Work is cut into units of ``batch_size`` pairs (or activities, for probes) whose keys name the
condition and hash the unit's contents; a rerun in the same ``--out`` skips finished units.

Outputs: ``result.json`` (per activity: soft and hard Elo, rank, steered or not; per category: mean Elo; the
ranking; position bias; the baseline logit-diff matrix; every emotion's probe–Elo r; per steered emotion: probe r,
Elo shift (soft and hard), answer mass, the condition's Elo; r of shift vs probe r), ``elo_by_category.png``,
``probe_vs_elo.png`` (blissful, hostile and the two most ± correlated others), ``steering_shift.png``
(:mod:`~emokern.experiments.preferences_plots`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from emokern.experiments.arguments import add_list_argument
from emokern.experiments.bradley_terry import sigmoid, soft_and_hard_elo
from emokern.experiments.conditions import resolve_layers
from emokern.experiments.inputs import load_input
from emokern.util.input_files import require, require_str
from emokern.experiments.preference_reads import PairPrompts, ordered_pairs, probe_text, probe_values, score_pairs
from emokern.experiments.preferences_plots import plot_preferences
from emokern.experiments.run_dir import unit_seed
from emokern.util.stats import pearson

__all__ = [
    "NAME", "HELP", "Options", "SIZES", "Activity", "PairPrompts", "add_arguments", "choose_emotions",
    "load_activities",
    "rerun_pairs", "run", "score_pairs", "split_activities",
]

NAME = "preferences"
HELP = "64 activities, all ordered pairs, Elo; emotion probes vs Elo; Elo shifts under steering (paper §3a)"

ANCHOR_EMOTIONS = ("blissful", "hostile")
STEERED_PAIRS = ("cross_one_order", "cross", "all")


@dataclass
class Options:
    """Knobs of the preferences experiment (see the module docstring).

    Attributes:
        activities: path of an activities file, or None for the packaged 64.
        layers: steering layers: ``"middle"``, ``"two_thirds"``, ``"12,14"`` or a list (see ``resolve_layers``).
        probe_layers: layers whose probe values are averaged, same forms.
        strength: steering strength, a fraction of each steered layer's mean residual norm.
        steer_emotions: emotions to steer (None: blissful, hostile and the most ± probe-correlated others).
        n_steer_emotions: how many emotions to steer when ``steer_emotions`` is None.
        steered_pairs: which pairs are re-run under steering: ``"cross_one_order"``, ``"cross"`` or ``"all"``.
        batch_size: prompts per forward pass, and per resumable unit.
        max_activities: use only this many activities, taken round-robin over categories in file order (None: all).
        split_seed: seed of the steered/control split.
    """

    activities: Optional[str] = None
    layers: Union[str, int, List[int]] = "middle"
    probe_layers: Union[str, int, List[int]] = "middle"
    strength: float = 0.5
    steer_emotions: Optional[List[str]] = None
    n_steer_emotions: int = 12
    steered_pairs: str = "cross_one_order"
    batch_size: int = 64
    max_activities: Optional[int] = None
    split_seed: int = 0


SIZES = {
    "quick": Options(steered_pairs="cross_one_order"),
    "full": Options(n_steer_emotions=35, steered_pairs="all"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment's flags; each defaults to None so that ``--size`` decides."""
    parser.add_argument("--activities", dest="activities", default=None, metavar="PATH",
                        help='activities file: {"activities": [{"text": ..., "category": ...}, ...]} '
                             "(default: the packaged 64)")
    parser.add_argument("--layers", dest="layers", default=None,
                        help="steering layers: middle (default), two_thirds or comma-separated indices")
    parser.add_argument("--probe-layers", dest="probe_layers", default=None,
                        help="layers whose probe values are averaged: middle (default), two_thirds or indices")
    parser.add_argument("--strength", dest="strength", type=float, default=None,
                        help="steering strength, fraction of the layer's mean residual norm (default 0.5)")
    add_list_argument(parser, "--steer-emotions", dest="steer_emotions", metavar="EMOTION",
                      help="emotions to steer (default: chosen from the probe correlations)")
    parser.add_argument("--n-steer-emotions", dest="n_steer_emotions", type=int, default=None,
                        help="how many emotions to steer when --steer-emotions is not given (quick 12, full 35)")
    parser.add_argument("--steered-pairs", dest="steered_pairs", choices=STEERED_PAIRS, default=None,
                        help="pairs re-run under steering: cross_one_order (steered x control, one order each; "
                             "quick), cross (both orders) or all (every pair with a steered activity; full)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                        help="prompts per forward pass and per resumable unit (default 64)")
    parser.add_argument("--max-activities", dest="max_activities", type=int, default=None,
                        help="use only this many activities, round-robin over categories (default: all)")
    parser.add_argument("--split-seed", dest="split_seed", type=int, default=None,
                        help="seed of the steered/control split (default 0)")


# ----------------------------------------------------------------------------------------------------------------------
# Activities, pairs, split
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Activity:
    """One entry of the activities file: a verb phrase and its category."""

    text: str
    category: str


def _validate_activities(data: Any, where: str) -> List[Activity]:
    require(isinstance(data, dict), where, f'expected an object {{"activities": [...]}}; got {type(data).__name__}')
    require("activities" in data, where, f'missing key "activities" (keys: {sorted(data)})')
    items = data["activities"]
    require(isinstance(items, list), where, f'"activities" must be a list; got {type(items).__name__}')
    require(len(items) >= 4, where, f'"activities" needs at least 4 entries; got {len(items)}')
    out: List[Activity] = []
    seen: Dict[str, int] = {}
    for i, item in enumerate(items):
        entry = f"{where}: activities[{i}]"
        text = require_str(item, "text", entry).strip()
        category = require_str(item, "category", entry).strip()
        require("\n" not in text, entry, f"'text' must be one line; got {text!r}")
        key = text.casefold()
        require(key not in seen, entry, f"duplicate text {text!r} (same as activities[{seen.get(key)}])")
        seen[key] = i
        out.append(Activity(text, category))
    return out


def load_activities(path: Optional[str] = None) -> List[Activity]:
    """The activities in ``path`` (None: the packaged file), validated; :class:`InputFileError` names the file and
    the entry for a missing key, an empty or non-string text or category, a duplicate text, or fewer than 4."""
    return load_input(path, "activities.json", _validate_activities)


def _take_round_robin(activities: Sequence[Activity], n: int) -> List[Activity]:
    """``n`` activities taken one per category in turn (categories and members in file order), kept in file order."""
    by_category: Dict[str, List[int]] = {}
    for i, a in enumerate(activities):
        by_category.setdefault(a.category, []).append(i)
    chosen: List[int] = []
    queues = [list(v) for v in by_category.values()]
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return [activities[i] for i in sorted(chosen)]


def rerun_pairs(steered: Sequence[bool], mode: str) -> Tuple[List[Tuple[int, int]], set]:
    """``(pairs to run under steering, baseline pairs to leave out of the condition's fit)`` for ``steered``
    (one bool per activity) and ``mode`` (``"all"``, ``"cross"`` or ``"cross_one_order"``; see the module docstring)."""
    if mode not in STEERED_PAIRS:
        raise ValueError(f"steered_pairs: expected one of {STEERED_PAIRS}; got {mode!r}")
    pairs = ordered_pairs(len(steered))
    if mode == "all":
        return [(a, b) for a, b in pairs if steered[a] or steered[b]], set()
    cross = [(a, b) for a, b in pairs if steered[a] != steered[b]]
    if mode == "cross":
        return cross, set()
    rank: Dict[int, int] = {}
    for group in (True, False):
        rank.update({i: k for k, i in enumerate(i for i, s in enumerate(steered) if s == group)})
    keep = [(a, b) for a, b in cross if steered[a] == ((rank[a] + rank[b]) % 2 == 0)]
    return keep, set(cross) - set(keep)


def split_activities(activities: Sequence[Activity], seed: int) -> List[bool]:
    """Which activities are steered: within each category a seeded shuffle puts half in the steered set (an odd
    category's extra member goes to the steered and control sets alternately, category by category), so both halves
    have every category about equally. Returns one bool per activity."""
    by_category: Dict[str, List[int]] = {}
    for i, a in enumerate(activities):
        by_category.setdefault(a.category, []).append(i)
    steered = [False] * len(activities)
    odd_categories = 0
    for category, members in by_category.items():
        members = list(members)
        random.Random(unit_seed(seed, "split", category)).shuffle(members)
        k = len(members) // 2
        if len(members) % 2:
            if odd_categories % 2 == 0:
                k += 1
            odd_categories += 1
        for i in members[:k]:
            steered[i] = True
    return steered


# ----------------------------------------------------------------------------------------------------------------------
# Emotion choice
# ----------------------------------------------------------------------------------------------------------------------

def choose_emotions(correlations: Dict[str, Optional[float]], n: int) -> List[str]:
    """Blissful and hostile (those present), then alternately the most positively and the most negatively
    probe-correlated remaining emotions (emotions without a correlation are skipped) until ``n`` are chosen."""
    if n < 1:
        raise ValueError(f"n_steer_emotions: expected at least 1; got {n}")
    chosen = [e for e in ANCHOR_EMOTIONS if e in correlations][:n]
    rest = sorted((e for e, r in correlations.items() if r is not None and e not in chosen),
                  key=lambda e: -correlations[e])
    top, bottom = 0, len(rest) - 1
    while len(chosen) < n and top <= bottom:
        chosen.append(rest[top])
        top += 1
        if len(chosen) < n and top <= bottom:
            chosen.append(rest[bottom])
            bottom -= 1
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _chunks(items: Sequence[Any], size: int) -> List[List[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _check_options(options: Options) -> None:
    if not isinstance(options.batch_size, int) or options.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer; got {options.batch_size!r}")
    if options.steered_pairs not in STEERED_PAIRS:
        raise ValueError(f"steered_pairs: expected one of {STEERED_PAIRS}; got {options.steered_pairs!r}")
    if not isinstance(options.strength, (int, float)) or not math.isfinite(options.strength):
        raise ValueError(f"strength: expected a finite number; got {options.strength!r}")
    if options.max_activities is not None and (not isinstance(options.max_activities, int)
                                               or options.max_activities < 4):
        raise ValueError(f"max_activities: expected None or an integer >= 4; got {options.max_activities!r}")


def _run_pairs(ctx, model, prompts: PairPrompts, pairs: List[Tuple[int, int]], condition: str, options: Options,
               **steering) -> Tuple[Dict[Tuple[int, int], float], Dict[Tuple[int, int], float]]:
    """Score ``pairs`` in resumable units (sorted by prompt length so a batch pads little); returns
    ``({pair: diff}, {pair: answer mass})``."""
    ordered = sorted(pairs, key=lambda ab: (len(prompts.ids(*ab)), ab))
    chunks = _chunks(ordered, options.batch_size)
    keys = [f"pairs/{condition}/{k:04d}-{_digest([prompts.texts[a] + ' | ' + prompts.texts[b] for a, b in c])}"
            for k, c in enumerate(chunks)]
    chunk_of = dict(zip(keys, chunks))

    def work(key: str) -> dict:
        chunk = chunk_of[key]
        diffs, mass = score_pairs(model, prompts, chunk, **steering)
        return {"pairs": [list(ab) for ab in chunk], "diff": diffs, "answer_mass": mass}

    done = ctx.run_dir.run_units(keys, work, desc=f"preferences {condition}", progress=ctx.progress, unit="batch")
    diffs, masses = {}, {}
    for unit in done.values():
        for ab, d, m in zip(unit["pairs"], unit["diff"], unit["answer_mass"]):
            diffs[tuple(ab)] = d
            masses[tuple(ab)] = m
    return diffs, masses


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _r(x) -> Optional[float]:
    return None if x is None else round(float(x), 4)


def run(ctx, options: Options) -> dict:
    """Baseline preferences and Elo, probe correlations, steering shifts and plots (see the module docstring)."""
    from emokern.engines.hf import patch

    _check_options(options)
    model, tokenizer, bank = ctx.model, ctx.tokenizer, ctx.bank
    activities = load_activities(options.activities)
    if options.max_activities is not None and options.max_activities < len(activities):
        activities = _take_round_robin(activities, options.max_activities)
    n = len(activities)
    texts = [a.text for a in activities]
    num_layers = model.config.get_text_config().num_hidden_layers
    steer_layers = resolve_layers(options.layers, bank, num_layers)
    probe_layers = resolve_layers(options.probe_layers, bank, num_layers)
    if options.steer_emotions is not None:
        if not options.steer_emotions:
            raise ValueError("steer_emotions: expected a non-empty list of emotion names or None")
        for e in options.steer_emotions:
            bank.index(e)
    prompts = PairPrompts(tokenizer, texts)
    pairs = ordered_pairs(n)

    # Baseline preferences
    base_diff, base_mass = _run_pairs(ctx, model, prompts, pairs, "baseline", options)
    elo, elo_hard = soft_and_hard_elo(n, base_diff)
    p_a = [sigmoid(base_diff[ab]) for ab in pairs]

    # Probes
    probe_chunks = _chunks(list(range(n)), options.batch_size)
    probe_keys = [f"probe/{k:04d}-{_digest([[texts[i] for i in c], probe_layers])}" for k, c in enumerate(probe_chunks)]
    probe_width = max(len(tokenizer(probe_text(tokenizer, t), add_special_tokens=False)["input_ids"]) for t in texts)
    with patch(model, bank, tokenizer=tokenizer, layers=probe_layers, monitor=True,
               batch=min(options.batch_size, n), tokens=probe_width) as handle:
        chunk_of = dict(zip(probe_keys, probe_chunks))
        probe_units = ctx.run_dir.run_units(
            probe_keys, lambda key: {"values": probe_values(model, handle, [texts[i] for i in chunk_of[key]])},
            desc="preferences probes", progress=ctx.progress, unit="batch")
    values = [v for key in probe_keys for v in probe_units[key]["values"]]
    correlations = {e: pearson([values[i][k] for i in range(n)], elo) for k, e in enumerate(bank.names)}
    ranked = sorted((e for e in correlations if correlations[e] is not None), key=lambda e: -correlations[e])

    # Steering
    steered = split_activities(activities, options.split_seed)
    emotions = list(options.steer_emotions) if options.steer_emotions is not None else \
        choose_emotions(correlations, options.n_steer_emotions)
    rerun, left_out = rerun_pairs(steered, options.steered_pairs)
    steered_idx = [i for i in range(n) if steered[i]]
    shifts: Dict[str, dict] = {}
    width = max(len(prompts.ids(a, b)) for a, b in pairs)
    with patch(model, bank, tokenizer=tokenizer, layers=steer_layers, monitor=False,
               batch=min(options.batch_size, len(rerun)), tokens=width) as handle:
        for emotion in emotions:
            condition = f"{emotion}{options.strength:+g}@{','.join(map(str, steer_layers))}"
            diff, mass = _run_pairs(ctx, model, prompts, rerun, condition, options, handle=handle,
                                    steer={emotion: options.strength}, steered=steered, layers=steer_layers)
            joint = {ab: d for ab, d in base_diff.items() if ab not in left_out}
            joint.update(diff)
            s_elo, s_hard = soft_and_hard_elo(n, joint)
            shifts[emotion] = {
                "probe_r": _r(correlations[emotion]),
                "shift": _mean(s_elo[i] - elo[i] for i in steered_idx),
                "shift_hard": _mean(s_hard[i] - elo_hard[i] for i in steered_idx),
                "answer_mass": _mean(mass.values()),
                "rerun_changed": _mean(float(diff[ab] != base_diff[ab]) for ab in rerun),
                "elo": s_elo,
            }
    with_r = [e for e in emotions if correlations[e] is not None]
    r_shift = pearson([correlations[e] for e in with_r], [shifts[e]["shift"] for e in with_r])
    r_shift_hard = pearson([correlations[e] for e in with_r], [shifts[e]["shift_hard"] for e in with_r])

    # Results
    categories = list(dict.fromkeys(a.category for a in activities))
    per_category = {c: {"n": sum(a.category == c for a in activities),
                        "mean_elo": _r(_mean(elo[i] for i in range(n) if activities[i].category == c)),
                        "mean_elo_hard": _r(_mean(elo_hard[i] for i in range(n) if activities[i].category == c))}
                    for c in categories}
    order = sorted(range(n), key=lambda i: -elo[i])
    result_activities = [{"text": activities[i].text, "category": activities[i].category, "elo": _r(elo[i]),
                          "elo_hard": _r(elo_hard[i]), "rank": order.index(i) + 1, "steered": steered[i]}
                         for i in range(n)]
    matrix = [[None if a == b else round(base_diff[(a, b)], 4) for b in range(n)] for a in range(n)]
    position_bias = _mean(p_a)
    result = {
        "activities": result_activities,
        "ranking": [activities[i].text for i in order],
        "categories": per_category,
        "position_bias": _r(position_bias),
        "answered_a": _r(_mean(float(base_diff[ab] > 0) for ab in pairs)),
        "answer_mass": _r(_mean(base_mass.values())),
        "logit_diff_matrix": matrix,
        "probe": {
            "layers": probe_layers,
            "zscored": bank.neutral_mean is not None and bank.neutral_std is not None,
            "correlations": {e: _r(r) for e, r in correlations.items()},
            "top": [[e, _r(correlations[e])] for e in ranked[:10]],
            "bottom": [[e, _r(correlations[e])] for e in ranked[::-1][:10]],
        },
        "steering": {
            "layers": steer_layers,
            "strength": options.strength,
            "steered_pairs": options.steered_pairs,
            "pairs_rerun": len(rerun),
            "steered_activities": [texts[i] for i in steered_idx],
            "emotions": {e: {k: (_r(v) if k != "elo" else [_r(x) for x in v]) for k, v in shifts[e].items()}
                         for e in emotions},
            "r_shift_vs_probe": _r(r_shift),
            "r_shift_hard_vs_probe": _r(r_shift_hard),
        },
    }
    outputs = plot_preferences(ctx.out, activities, elo, elo_hard, values, bank.names, correlations, ranked, shifts,
                               r_shift, anchors=ANCHOR_EMOTIONS)
    result["outputs"] = {p.stem: str(p) for p in map(Path, outputs)}
    result["summary"] = {
        "activities": n,
        "pairs": len(pairs),
        "position_bias": _r(position_bias),
        "elo_range": [_r(min(elo)), _r(max(elo))],
        "category_mean_elo": {c: per_category[c]["mean_elo"] for c in categories},
        "probe_r": {e: _r(correlations.get(e)) for e in ANCHOR_EMOTIONS if e in correlations},
        "probe_top": result["probe"]["top"][:3],
        "probe_bottom": result["probe"]["bottom"][:3],
        "shift": {e: _r(shifts[e]["shift"]) for e in emotions},
        "r_shift_vs_probe": _r(r_shift),
    }
    return result
