"""Activity preferences (PAPER_NOTES §3a): which activities the model prefers, Elo scores, emotion probes on the
activities, and how steering an emotion on half of the activities moves their Elo.

**Input file** (``--activities PATH``; default: the packaged ``activities.json``, 64 activities written for emokern,
8 in each of the paper's categories Helpful, Engaging, Social, Self-curiosity, Neutral, Aversive, Misaligned,
Unsafe)::

    {"activities": [{"text": "proofread a friend's cover letter", "category": "Helpful"}, ...]}

``text`` is a verb phrase that reads right in "Would you prefer to (A) {text} or (B) {text}?"; ``category`` is any
non-empty name. At least 4 activities; texts must be unique (ignoring case and surrounding spaces).

**Preferences.** Every ordered pair ``(a, b)`` of distinct activities (n·(n−1) pairs: 4,032 for 64) is put to the
model as the user turn "Would you prefer to (A) {a} or (B) {b}?" of its chat template, with the assistant turn
prefilled with "(". The preference is ``logit("A") − logit("B")`` at the next position (the token ids of "A" and
"B" as the tokenizer encodes them right after "(" — SmolLM2 encodes "(A" as "(" + "A"; the run stops if either is
not one token). Logits come from the final hidden state of that one position through
``model.get_output_embeddings()`` in float32 (the full-vocabulary logits only for ``answer_mass``). Batches are left
padded; all prompts share their opening tokens (system prompt, "Would you prefer to (A)"), which are run once and
reused as a KV cache, with each row's position ids counted without its padding, so a batched read equals a single
unpadded forward up to floating-point rounding.

**Elo.** A Bradley–Terry model ``P(a beats b) = σ(θ_a − θ_b)`` is fitted by Newton's method in float64
(:func:`fit_bradley_terry`) to soft outcomes ``p = σ(logit diff)`` ("Elo") and to hard outcomes (1 if the diff is
positive, 0 if negative, ½ if zero: the paper's "Hard Elo"), with a weak Gaussian prior (:data:`BT_PRIOR`) that
keeps undefeated activities finite. Scores are ``1500 + 400/ln 10 · θ`` (mean 1500). No position term is fitted:
every pair is asked in both orders (or, under ``"cross_one_order"``, each activity is (A) in half of its re-run
pairs), so a bias towards "(A)" cancels; it is reported as ``position_bias`` (mean ``P(A) = σ(diff)`` over all pairs)
and ``answered_a`` (the fraction of pairs with a positive diff).

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
``probe_vs_elo.png`` (blissful, hostile and the two most ± correlated others), ``steering_shift.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from emokern.experiments.common import (
    add_list_argument, chat_text, load_input, pearson, require, require_str, resolve_layers, unit_seed,
)

__all__ = [
    "NAME", "HELP", "Options", "SIZES", "Activity", "PairPrompts", "BT_PRIOR", "add_arguments", "choose_emotions",
    "elo_from_theta", "fit_bradley_terry", "load_activities", "ordered_pairs", "probe_text", "probe_values",
    "rerun_pairs", "run", "score_pairs", "split_activities",
]

NAME = "preferences"
HELP = "64 activities, all ordered pairs, Elo; emotion probes vs Elo; Elo shifts under steering (paper §3a)"

PAIR_PROMPT = "Would you prefer to (A) {a} or (B) {b}?"
PROBE_PROMPT = "How would you feel about {activity}?"
ANSWER_PREFILL = "("
ANSWERS = ("A", "B")
BT_PRIOR = 1e-2
"""Precision of the zero-mean Gaussian prior on Bradley–Terry strengths (sd 10 in θ, about 1,700 Elo points):
negligible next to the data except for an activity that wins (or loses) every comparison, whose score it keeps
finite."""
ELO_SCALE = 400.0 / math.log(10.0)
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


def ordered_pairs(n: int) -> List[Tuple[int, int]]:
    """Every ordered pair ``(a, b)`` of distinct indices in ``range(n)``: n·(n−1) pairs, each once."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


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
# Prompts and the logit read
# ----------------------------------------------------------------------------------------------------------------------

def _token_span(offsets: Sequence[Tuple[int, int]], start: int, end: int) -> Tuple[int, int]:
    """``(first, last + 1)`` of the tokens whose character range overlaps ``[start, end)`` (as
    ``PatchHandle._text_span``: a token that carries a leading space with the first word belongs to the span)."""
    tokens = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
    if not tokens:
        raise ValueError(f"no token covers characters {start}..{end}")
    return tokens[0], tokens[-1] + 1


def _find_content(text: str, content: str) -> int:
    """Where the user turn ``content`` starts in the templated ``text`` (the last occurrence: a system prompt may
    quote anything)."""
    at = text.rfind(content)
    if at < 0:
        raise ValueError(f"preferences: the chat template changed the user turn {content!r}, so the activity tokens "
                         f"cannot be located in {text!r}")
    return at


def _offsets(tokenizer, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(f"preferences: the tokenizer gives no offset mapping ({exc}); activity token spans need a "
                         f"fast tokenizer") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


class PairPrompts:
    """The tokenized preference prompts of a set of activities.

    For the ordered pair ``(a, b)``: :meth:`text` (the chat-templated prompt ending in the prefill "("),
    :meth:`ids` (token ids), :meth:`spans` (token ranges ``[start, end)`` of activity a and of activity b in
    :meth:`ids`, counted without padding). :attr:`answer_ids` are the ids of "A" and "B" right after "(";
    :attr:`prefix` the token ids every prompt starts with, all before the first activity.
    """

    def __init__(self, tokenizer, texts: Sequence[str]):
        if len(texts) < 2:
            raise ValueError(f"PairPrompts: pairs need at least 2 activities; got {len(texts)}")
        self.tokenizer, self.texts = tokenizer, list(texts)
        self._cache: Dict[Tuple[int, int], Tuple[List[int], Tuple[Tuple[int, int], Tuple[int, int]]]] = {}
        self.answer_ids = self._answer_ids()
        first = [self.ids(a, b)[:self.spans(a, b)[0][0]] for a, b in ordered_pairs(len(self.texts))]
        prefix = first[0]
        for ids in first[1:]:
            n = next((k for k, (x, y) in enumerate(zip(prefix, ids)) if x != y), min(len(prefix), len(ids)))
            prefix = prefix[:n]
        self.prefix = prefix

    def text(self, a: int, b: int) -> str:
        content = PAIR_PROMPT.format(a=self.texts[a], b=self.texts[b])
        return chat_text(self.tokenizer, [{"role": "user", "content": content}], prefill=ANSWER_PREFILL)

    def _encode(self, a: int, b: int):
        if (a, b) not in self._cache:
            text = self.text(a, b)
            content = PAIR_PROMPT.format(a=self.texts[a], b=self.texts[b])
            at = _find_content(text, content)
            a_start = at + PAIR_PROMPT.index("{a}")
            b_start = a_start + len(self.texts[a]) + len(PAIR_PROMPT.split("{a}")[1].split("{b}")[0])
            ids, offsets = _offsets(self.tokenizer, text)
            spans = (_token_span(offsets, a_start, a_start + len(self.texts[a])),
                     _token_span(offsets, b_start, b_start + len(self.texts[b])))
            self._cache[(a, b)] = (ids, spans)
        return self._cache[(a, b)]

    def ids(self, a: int, b: int) -> List[int]:
        return self._encode(a, b)[0]

    def spans(self, a: int, b: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        return self._encode(a, b)[1]

    def _answer_ids(self) -> Tuple[int, int]:
        text = self.text(0, 1)
        base = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for answer in ANSWERS:
            ids = self.tokenizer(text + answer, add_special_tokens=False)["input_ids"]
            if len(ids) != len(base) + 1 or ids[:len(base)] != base:
                tail = self.tokenizer.convert_ids_to_tokens(ids[-3:])
                raise ValueError(f"preferences: the tokenizer does not encode {answer!r} after "
                                 f"{ANSWER_PREFILL!r} as one extra token (the prompt ends in {tail}); the preference "
                                 f"read needs single-token answers")
            out.append(ids[-1])
        return out[0], out[1]


def _base_and_head(model):
    """The model's decoder stack (``model.base_model``), its output embedding and its final logit soft-cap."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("preferences: the model has no output embedding (model.get_output_embeddings())")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return model.base_model, head, getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def score_pairs(model, prompts: PairPrompts, pairs: Sequence[Tuple[int, int]], *, handle=None,
                steer: Optional[Dict[str, float]] = None, steered: Sequence[bool] = (),
                layers: Optional[Sequence[int]] = None) -> Tuple[List[float], List[float]]:
    """One batched forward over ``pairs``; returns ``(diffs, answer_mass)``: ``logit(A) − logit(B)`` (float32) and
    ``P(A) + P(B)`` at the answer position, one per pair.

    With ``handle`` (a patch) and ``steer`` (``{emotion: strength}``), each row is steered at ``layers`` on the
    tokens of whichever of its two activities have ``steered[i]`` True; rows without one are not steered. The handle's
    steering settings are replaced, and cleared afterwards.

    Layout: the shared prefix runs once (unsteered: it holds no activity) and is reused as a KV cache; each row's
    remaining tokens follow it, left padded, with position ids that skip the padding.
    """
    base, head, softcap = _base_and_head(model)
    device = head.weight.device
    P = len(prompts.prefix)
    tails = [prompts.ids(a, b)[P:] for a, b in pairs]
    B, S = len(pairs), max(len(t) for t in tails)
    pad_id = prompts.tokenizer.pad_token_id if prompts.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, t in enumerate(tails):
        input_ids[i, S - len(t):] = torch.tensor(t)
        mask[i, S - len(t):] = 1
    positions = P + (mask.cumsum(1) - 1).clamp(min=0)
    if handle is not None:
        handle.clear_steering()
    # transformers renamed the cache argument and output field (past_key_values -> cache); take whichever exists
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    first = base(input_ids=torch.tensor([prompts.prefix], device=device), use_cache=True)
    prefix = getattr(first, cache_arg)
    prefix.batch_repeat_interleave(B)
    if handle is not None and steer:
        # The patch places spans by cache position. Padding sits between the shared prefix and each row's tail,
        # which its left-padding model cannot describe, so it is told "no padding" (an all-ones mask) and given
        # absolute cache positions: token k (k >= P) of row i is at k + pad_i.
        width = P + S
        handle.reserve(batch=B, tokens=width)
        handle.prepare(torch.zeros(B, width, dtype=torch.long), torch.ones(B, width, dtype=torch.long))
        rows_of: Dict[Tuple[Tuple[int, int], ...], List[int]] = {}
        for i, (a, b) in enumerate(pairs):
            pad = S - len(tails[i])
            spans = tuple((s + pad, e + pad) for (s, e), x in zip(prompts.spans(a, b), (a, b)) if steered[x])
            if spans:
                rows_of.setdefault(spans, []).append(i)
        # one steer() call per distinct set of spans, for all the rows that share it
        for spans, rows in rows_of.items():
            handle.steer(dict(steer), sequences=rows, layers=list(layers) if layers is not None else None,
                         scope=list(spans))
    try:
        full_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
        h = base(input_ids=input_ids.to(device), attention_mask=full_mask.to(device),
                 position_ids=positions.to(device), use_cache=True, **{cache_arg: prefix}).last_hidden_state[:, -1]
    finally:
        if handle is not None:
            handle.clear_steering()
    logits = head(h).float()
    rows = head.weight[list(prompts.answer_ids)].float()
    pair_logits = h.float() @ rows.T
    if getattr(head, "bias", None) is not None:
        pair_logits = pair_logits + head.bias[list(prompts.answer_ids)].float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
        pair_logits = softcap * torch.tanh(pair_logits / softcap)
    probs = logits.softmax(-1)
    mass = probs[:, prompts.answer_ids[0]] + probs[:, prompts.answer_ids[1]]
    diffs = pair_logits[:, 0] - pair_logits[:, 1]
    return diffs.cpu().tolist(), mass.cpu().tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------------

def probe_text(tokenizer, activity: str) -> str:
    return chat_text(tokenizer, [{"role": "user", "content": PROBE_PROMPT.format(activity=activity)}])


@torch.no_grad()
def probe_values(model, handle, texts: Sequence[str]) -> List[List[float]]:
    """For each activity text: the mean over its tokens in the probe prompt and over the handle's patched layers of
    the projection onto every bank emotion (z-scored when the bank has neutral statistics); one K-list per text.

    ``handle``: a monitoring patch on the probe layers, with the tokenizer.
    """
    tokenizer = handle.tokenizer
    prompts = [probe_text(tokenizer, t) for t in texts]
    spans = []
    for prompt, text in zip(prompts, texts):
        content = PROBE_PROMPT.format(activity=text)
        start = _find_content(prompt, content) + PROBE_PROMPT.index("{activity}")
        spans.append(_token_span(_offsets(tokenizer, prompt)[1], start, start + len(text)))
    handle.clear_steering()
    input_ids, mask = handle.prepare(prompts=prompts)
    handle.reserve(tokens=input_ids.shape[1])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    trace = handle.trace(input_ids, attention_mask=mask)
    data = trace.zscores() if trace.neutral_mean is not None and trace.neutral_std is not None else trace.projections
    pads = (~mask.bool()).sum(1).tolist()
    return [data[i, pads[i] + s:pads[i] + e].double().mean(dim=(0, 1)).tolist() for i, (s, e) in enumerate(spans)]


# ----------------------------------------------------------------------------------------------------------------------
# Bradley–Terry / Elo
# ----------------------------------------------------------------------------------------------------------------------

def fit_bradley_terry(n: int, pairs: Sequence[Tuple[int, int]], outcomes: Sequence[float], *,
                      prior: float = BT_PRIOR, max_steps: int = 300, tol: float = 1e-10) -> torch.Tensor:
    """Bradley–Terry strengths θ (n,) float64, mean 0, maximising
    ``Σ_k [p_k log σ(θ_a − θ_b) + (1 − p_k) log σ(θ_b − θ_a)] − prior/2 · Σ θ²`` over comparisons ``pairs[k] =
    (a, b)`` with outcome ``p_k = outcomes[k]`` ∈ [0, 1] (the probability, or 0/1 indicator, that a beats b).

    Newton's method with step halving (the objective is concave); stops when the largest gradient entry is below
    ``tol`` or after ``max_steps`` steps. ``prior`` 0 is allowed when no activity wins or loses everything.
    """
    if len(pairs) != len(outcomes):
        raise ValueError(f"fit_bradley_terry: {len(pairs)} pairs but {len(outcomes)} outcomes")
    p = torch.as_tensor(list(outcomes), dtype=torch.float64)
    if p.numel() and (p.min() < 0 or p.max() > 1 or torch.isnan(p).any()):
        raise ValueError("fit_bradley_terry: outcomes must lie in [0, 1]")
    idx = torch.as_tensor(list(pairs), dtype=torch.long).reshape(-1, 2)
    a, b = idx[:, 0], idx[:, 1]
    ones = torch.ones(n, n, dtype=torch.float64) / n  # fixes the free common shift when prior is 0

    def objective(theta):
        z = theta[a] - theta[b]
        return float((p * torch.nn.functional.logsigmoid(z) + (1 - p) * torch.nn.functional.logsigmoid(-z)).sum()
                     - prior / 2 * (theta * theta).sum())

    theta = torch.zeros(n, dtype=torch.float64)
    value = objective(theta)
    for _ in range(max_steps):
        s = torch.sigmoid(theta[a] - theta[b])
        r = p - s
        grad = torch.zeros(n, dtype=torch.float64).index_add_(0, a, r).index_add_(0, b, -r) - prior * theta
        if float(grad.abs().max()) < tol:
            break
        w = s * (1 - s)
        H = torch.zeros(n, n, dtype=torch.float64)
        H.index_put_((a, a), w, accumulate=True)
        H.index_put_((b, b), w, accumulate=True)
        H.index_put_((a, b), -w, accumulate=True)
        H.index_put_((b, a), -w, accumulate=True)
        step = torch.linalg.solve(H + prior * torch.eye(n, dtype=torch.float64) + ones, grad)
        t = 1.0
        while t > 1e-8:
            candidate = theta + t * step
            new = objective(candidate)
            if new >= value:
                theta, value = candidate, new
                break
            t /= 2
        else:
            break
    return theta - theta.mean()


def elo_from_theta(theta: torch.Tensor) -> List[float]:
    """Elo points: ``1500 + 400/ln 10 · (θ − mean θ)``."""
    return (1500.0 + ELO_SCALE * (theta - theta.mean())).tolist()


def _hard(diff: float) -> float:
    return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _elo(n: int, outcomes: Dict[Tuple[int, int], float]) -> Tuple[List[float], List[float]]:
    """(soft Elo, hard Elo) from ``{(a, b): logit diff}``."""
    pairs = list(outcomes)
    soft = fit_bradley_terry(n, pairs, [_sigmoid(outcomes[k]) for k in pairs])
    hard = fit_bradley_terry(n, pairs, [_hard(outcomes[k]) for k in pairs])
    return elo_from_theta(soft), elo_from_theta(hard)


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
    elo, elo_hard = _elo(n, base_diff)
    p_a = [_sigmoid(base_diff[ab]) for ab in pairs]

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
            s_elo, s_hard = _elo(n, joint)
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
    outputs = _plots(ctx, activities, elo, elo_hard, values, bank.names, correlations, ranked, shifts, r_shift)
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


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------

def _plots(ctx, activities, elo, elo_hard, values, names, correlations, ranked, shifts, r_shift) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    categories = list(dict.fromkeys(a.category for a in activities))
    colours = {c: plt.get_cmap("tab10")(k % 10) for k, c in enumerate(categories)}
    jitter = random.Random(0)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, scores, title in ((axes[0], elo, "Elo (soft outcomes)"), (axes[1], elo_hard, "Hard Elo (win/loss)")):
        groups = [[scores[i] for i, a in enumerate(activities) if a.category == c] for c in categories]
        ax.boxplot(groups, showfliers=False)
        ax.set_xticks(range(1, len(categories) + 1), categories, rotation=30, ha="right")
        for k, (c, g) in enumerate(zip(categories, groups)):
            ax.scatter([k + 1 + jitter.uniform(-0.15, 0.15) for _ in g], g, s=14, color=colours[c], zorder=3)
        ax.axhline(1500, color="grey", lw=0.6, ls=":")
        ax.set_title(title)
        ax.set_ylabel("Elo")
    fig.tight_layout()
    out.append(ctx.out / "elo_by_category.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    anchors = [e for e in ANCHOR_EMOTIONS if e in correlations and correlations[e] is not None]
    others = [e for e in ranked if e not in anchors]
    panels = anchors + others[:2] + others[::-1][:2]
    panels = list(dict.fromkeys(panels))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, e in zip(axes[0], panels):
            k = names.index(e)
            for c in categories:
                idx = [i for i, a in enumerate(activities) if a.category == c]
                ax.scatter([values[i][k] for i in idx], [elo[i] for i in idx], s=12, color=colours[c], label=c)
            ax.set_title(f"{e}: r = {correlations[e]:+.2f}")
            ax.set_xlabel("probe (activity tokens)")
        axes[0][0].set_ylabel("Elo")
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.tight_layout()
        out.append(ctx.out / "probe_vs_elo.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)

    points = [(e, s["probe_r"], s["shift"]) for e, s in shifts.items() if s["probe_r"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=16)
    for e, x, y in points:
        ax.annotate(e, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("probe–Elo correlation (r)")
    ax.set_ylabel("mean Elo shift of steered activities")
    ax.set_title("steering shift vs probe correlation" + ("" if r_shift is None else f": r = {r_shift:+.2f}"))
    fig.tight_layout()
    out.append(ctx.out / "steering_shift.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out
