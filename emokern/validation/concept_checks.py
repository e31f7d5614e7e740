"""Sections 5-7 of ``emokern report``: does a bank read an emotion *concept* and does it *cause* it (PAPER_NOTES §2
and its appendix)?

5. **Implicit scenarios.** User messages that call up an emotion without naming it (``data/validation/
   implicit_scenarios.json``), each read at the last token of the chat prompt, where the assistant's reply begins
   (the paper's "Assistant colon"). Score: the cosine of that activation with each scenario emotion's vector,
   centred per emotion (minus its mean over the scenarios, so that an emotion raised everywhere, like the paper's
   "loving", does not win every row); the rank of the scenario's own emotion among the K' scenario emotions in the
   bank. Reported: top-1 and top-3 (chance 1/K' and min(3, K')/K', with a one-sided binomial p for top-1), the mean
   rank (chance (K'+1)/2), the same without centring, the scenario × emotion matrix and the per-layer curve.
6. **Intensity.** Prompts with one number varied (``intensity_templates.json``); for each template and each
   emotion with an expected direction, the Spearman ρ between the number and the cosine at the last prompt token.
   Reported: every ρ, the share of (template, emotion) pairs whose ρ has the expected sign (chance 0.5) with a
   one-sided sign-test p-value (pairs with ρ = 0 or undefined are left out), the mean signed ρ (ρ times the
   expected sign; chance 0) and the per-layer curve.
7. **Steering sanity check.** For each probe of ``steering_sanity.json`` (a user question and the start of the
   assistant's reply, e.g. "... he is feeling"), the assistant-turn tokens (every token after the user's message)
   are steered toward one emotion at a time at the steering layer, and the next-token log-probability of every
   emotion word is read. An emotion takes part when the first token of its word after the probe's prefix is shared
   with no other emotion (single-token words, and multi-token ones by their first token; the JSON says which). The
   *rise* of a word is its steered minus its unsteered log-probability, averaged over the probes; the *rank* of an
   emotion is the place of its own word's rise among the N candidates' rises (1 = its own word rose most).
   Reported at each strength: top-1 / top-5 / mean rank (chance 1/N, min(5, N)/N, (N+1)/2), the rank distribution,
   a sweep over up to :data:`MAX_SWEEP_LAYERS` layers at the middle strength, and the leak check: greedy answers to
   a neutral question steered (every token) toward each scenario emotion in the bank (chosen to spread over valence
   and arousal; generation is the costly part, so not all K) at the middle strength, and the share that name the
   steered emotion (any form, :func:`emokern.extraction.emotion_words.find_emotion_word`) against the share of those emotions
   named in the unsteered answer.

Scenarios and intensity prompts are read at the report's layer with curves over all bank layers; steering uses
the bank's two-thirds layer (:meth:`VectorBank.two_thirds_layer`, where the demo steers: at the last layers, where
the report often reads, adding a vector is little more than the logit lens). Strengths are fractions of the layer's
mean residual norm, as everywhere in emokern.

The data files can be replaced (``emokern report --scenarios / --intensity / --steering-prompts``); a malformed file
raises :class:`emokern.experiments.inputs.InputFileError` naming the file and the entry.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from emokern.core.bank import VectorBank
from emokern.experiments.chat import chat_text
from emokern.experiments.inputs import InputFileError, require, require_str
from emokern.experiments.run_dir import progress_bar
from emokern.validation.report import _e, _figure, _fmt, _img, _save, _table

__all__ = [
    "IntensityTemplate",
    "Scenario",
    "SanityPrompts",
    "STEERING_STRENGTHS",
    "intensity_scores",
    "last_token_states",
    "load_intensity",
    "load_sanity_prompts",
    "load_scenarios",
    "scenario_ranks",
    "validation_html",
    "validation_sections",
]

PathLike = Union[str, os.PathLike]

#: Steering strengths of the sanity check, fractions of the steering layer's mean residual norm (the paper used 0.5
#: on a few tokens).
STEERING_STRENGTHS = (0.1, 0.25, 0.5)
SCENARIO_TOP = 3
STEERING_TOP = 5
#: At most this many layers (the steering layer included) in the steering sweep; each costs a few batched forwards
#: (measured on SmolLM2-135M on 2 shared CPU cores: about 7 s per batch of 64 steered rows).
MAX_SWEEP_LAYERS = 4
#: Rows per batched steered forward.
STEER_BATCH = 64
MIN_INTENSITY_VALUES = 4
MAX_EXPECTED = 3
MAX_LEAK_TOKENS = 256


# ----------------------------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A user message that evokes ``emotion`` without naming it."""

    emotion: str
    prompt: str


@dataclass(frozen=True)
class IntensityTemplate:
    """``template`` with ``{value}`` replaced by each of ``values`` (increasing); ``expected`` maps an emotion to
    +1 (it should rise with the number) or -1 (fall)."""

    name: str
    template: str
    values: Tuple[float, ...]
    expected: Dict[str, int]

    def prompts(self) -> List[str]:
        return [self.template.replace("{value}", _number(v)) for v in self.values]


@dataclass(frozen=True)
class SanityPrompts:
    """``probes``: (user question, start of the assistant's reply) pairs; ``leak_user``: the neutral question of
    the leak check, answered in ``leak_tokens`` new tokens."""

    probes: Tuple[Tuple[str, str], ...]
    leak_user: str
    leak_tokens: int


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _read(path: Optional[PathLike], default: str):
    where = str(path) if path is not None else f"<packaged data/validation/{default}>"
    file = Path(path) if path is not None else Path(str(files("emokern").joinpath("data", "validation", default)))
    if not file.is_file():
        raise InputFileError(f"input file {where!r} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8")), where
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"input file {where!r} is not valid JSON: {exc}") from None


def _entries(data, key: str, where: str) -> list:
    require(isinstance(data, Mapping), where, f"expected a JSON object with a {key!r} list; got "
                                              f"{type(data).__name__}")
    entries = data.get(key)
    require(isinstance(entries, list) and len(entries) > 0, where,
            f"expected {key!r} to be a non-empty list; got {entries!r:.80}")
    return entries


def _emotion(value, where: str) -> str:
    from emokern.core.emotions import EMOTIONS, did_you_mean

    require(isinstance(value, str) and value in EMOTIONS, where,
            f"expected one of the 171 emotion words (emokern/data/emotions_171.txt); got {value!r}"
            + (did_you_mean(value, EMOTIONS) if isinstance(value, str) else ""))
    return value


def load_scenarios(path: Optional[PathLike] = None) -> List[Scenario]:
    """The implicit scenarios of ``path`` (default: the packaged ``implicit_scenarios.json``).

    Shape: ``{"scenarios": [{"emotion": WORD, "prompt": TEXT}, ...]}``, at least two distinct emotions (a rank
    among one emotion means nothing). Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "implicit_scenarios.json")
    out = []
    for i, entry in enumerate(_entries(data, "scenarios", where)):
        at = f"{where}: scenarios[{i}]"
        prompt = require_str(entry, "prompt", at)
        out.append(Scenario(_emotion(entry.get("emotion"), at), prompt))
    emotions = {s.emotion for s in out}
    require(len(emotions) >= 2, where, f"expected scenarios of at least 2 distinct emotions; got {sorted(emotions)}")
    return out


def load_intensity(path: Optional[PathLike] = None) -> List[IntensityTemplate]:
    """The intensity templates of ``path`` (default: the packaged ``intensity_templates.json``).

    Shape: ``{"templates": [{"name": TEXT, "template": "... {value} ...", "values": [n1 < n2 < ...],
    "expected": {WORD: "+" | "-"}}, ...]}``: ``{value}`` exactly once, at least 4 strictly increasing numbers,
    1 to 3 expected emotions. Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "intensity_templates.json")
    out = []
    for i, entry in enumerate(_entries(data, "templates", where)):
        at = f"{where}: templates[{i}]"
        name = require_str(entry, "name", at)
        template = require_str(entry, "template", at)
        require(template.count("{value}") == 1, at,
                f"'template' must contain {{value}} exactly once; got {template!r}")
        values = entry.get("values")
        require(isinstance(values, list) and len(values) >= MIN_INTENSITY_VALUES
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values),
                at, f"'values' must be a list of at least {MIN_INTENSITY_VALUES} finite numbers; got {values!r}")
        require(all(a < b for a, b in zip(values, values[1:])), at,
                f"'values' must be strictly increasing; got {values}")
        expected = entry.get("expected")
        require(isinstance(expected, Mapping) and 1 <= len(expected) <= MAX_EXPECTED, at,
                f"'expected' must map 1 to {MAX_EXPECTED} emotions to '+' or '-'; got {expected!r}")
        signs = {}
        for emotion, sign in expected.items():
            _emotion(emotion, f"{at}.expected")
            require(sign in ("+", "-"), f"{at}.expected[{emotion!r}]", f"expected '+' or '-'; got {sign!r}")
            signs[emotion] = 1 if sign == "+" else -1
        out.append(IntensityTemplate(name, template, tuple(float(v) for v in values), signs))
    return out


def load_sanity_prompts(path: Optional[PathLike] = None) -> SanityPrompts:
    """The steering sanity prompts of ``path`` (default: the packaged ``steering_sanity.json``).

    Shape: ``{"probes": [{"user": TEXT, "prefix": TEXT}, ...], "leak": {"user": TEXT, "max_new_tokens": N}}``
    with 1 <= N <= 256. Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "steering_sanity.json")
    probes = []
    for i, entry in enumerate(_entries(data, "probes", where)):
        at = f"{where}: probes[{i}]"
        probes.append((require_str(entry, "user", at), require_str(entry, "prefix", at)))
    leak = data.get("leak")
    user = require_str(leak, "user", f"{where}: leak")
    tokens = leak.get("max_new_tokens")
    require(isinstance(tokens, int) and not isinstance(tokens, bool) and 1 <= tokens <= MAX_LEAK_TOKENS,
            f"{where}: leak", f"'max_new_tokens' must be an int in [1, {MAX_LEAK_TOKENS}]; got {tokens!r}")
    return SanityPrompts(tuple(probes), user, tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> Dict:
    # A chat template writes its own special tokens; the plain Human:/Assistant: frame gets the tokenizer's (BOS).
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None),
                     return_offsets_mapping=True)


def last_token_states(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], *,
                      progress: bool = False, desc: str = "prompts") -> torch.Tensor:
    """(n, L, d) float32: the residual stream (output of decoder layer ``layers[j]``, before any final norm) at the
    last token of each user message rendered as a chat prompt with the assistant's turn opened
    (:func:`emokern.experiments.chat.chat_text`). One prompt per forward, so no padding can shift a position."""
    from emokern.core.architecture import resolve_architecture

    _, base, decoder_layers = resolve_architecture(model)
    device = model.get_input_embeddings().weight.device
    out = torch.empty(len(prompts), len(layers), int(model.get_input_embeddings().weight.shape[1]))
    caught: Dict[int, torch.Tensor] = {}

    def hook(j):
        def grab(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            caught[j] = h[0, -1].float().cpu()
        return grab

    handles = [decoder_layers[layer].register_forward_hook(hook(j)) for j, layer in enumerate(layers)]
    bar = progress_bar(len(prompts), desc=desc, enabled=progress, unit="prompt")
    try:
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                ids = _encode(tokenizer, chat_text(tokenizer, [{"role": "user", "content": prompt}]))["input_ids"]
                base(input_ids=torch.tensor([ids], device=device))
                out[i] = torch.stack([caught[j] for j in range(len(layers))])
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return out


def _cosines(states: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(n, L, d) states against (L, K, d) vectors -> (n, L, K) cosine similarities (float64)."""
    s = states.double() / states.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v = vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("nld,lkd->nlk", s, v)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Implicit scenarios
# ----------------------------------------------------------------------------------------------------------------------


def scenario_ranks(scores: torch.Tensor, targets: Sequence[int], *, centre: bool = True) -> torch.Tensor:
    """The 1-based rank of each row's target column: ``scores`` (n, K'), ``targets[i]`` the column of row i's
    emotion. With ``centre``, each column's mean over the rows is subtracted first. Ties count in the target's
    favour (rank = 1 + the number of strictly higher scores)."""
    s = scores.double()
    if centre:
        s = s - s.mean(0, keepdim=True)
    t = torch.as_tensor(list(targets))
    own = s[torch.arange(len(t)), t]
    return 1 + (s > own[:, None]).sum(1)


def _binomial_p(k: int, n: int, p: float) -> Optional[float]:
    """One-sided P(X >= k) for X ~ Binomial(n, p); ``None`` for n = 0."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, p, alternative="greater").pvalue) if n else None


def _scenarios(bank: VectorBank, scenarios: List[Scenario], cos: torch.Tensor, slot: int, layer: int,
               out_dir: Path) -> Dict:
    kept = [i for i, s in enumerate(scenarios) if s.emotion in bank.names]
    emotions = list(dict.fromkeys(scenarios[i].emotion for i in kept))
    skipped = sorted({s.emotion for s in scenarios if s.emotion not in bank.names})
    K = len(emotions)
    out: Dict = {"n_scenarios": len(kept), "n_skipped": len(scenarios) - len(kept), "skipped_emotions": skipped,
                 "emotions": emotions, "n_emotions": K,
                 "measure": "cosine of the activation at the last prompt token with each scenario emotion's vector, "
                            "centred per emotion (minus its mean over the scenarios); rank of the scenario's own "
                            "emotion among the scenario emotions"}
    if K < 2:
        out["note"] = f"needs scenarios of at least 2 of the bank's emotions; got {K}"
        return out
    columns = [bank.index(e) for e in emotions]
    targets = [emotions.index(scenarios[i].emotion) for i in kept]
    scores = cos[kept][:, :, columns]  # (n, L, K')
    k3 = min(SCENARIO_TOP, K)

    def summary(ranks: torch.Tensor) -> Dict:
        return {"top1": float((ranks == 1).double().mean()), f"top{SCENARIO_TOP}": float((ranks <= k3).double().mean()),
                "mean_rank": float(ranks.double().mean())}

    per_layer = [scenario_ranks(scores[:, j], targets) for j in range(scores.shape[1])]
    ranks = per_layer[slot]
    hits = int((ranks == 1).sum())
    centred = scores[:, slot] - scores[:, slot].mean(0, keepdim=True)
    out.update(summary(ranks))
    out.update({
        "chance_top1": 1 / K, f"chance_top{SCENARIO_TOP}": k3 / K, "chance_mean_rank": (K + 1) / 2,
        "top1_binomial_p": _binomial_p(hits, len(kept), 1 / K),
        "uncentred": summary(scenario_ranks(scores[:, slot], targets, centre=False)),
        "per_layer": {"layers": list(bank.layers), "top1": [float((r == 1).double().mean()) for r in per_layer],
                      f"top{SCENARIO_TOP}": [float((r <= k3).double().mean()) for r in per_layer]},
        "matrix": {"rows": [scenarios[i].emotion for i in kept], "columns": emotions,
                   "values": np.round(centred.numpy(), 5).tolist()},
        "per_scenario": [{"emotion": scenarios[i].emotion, "prompt": scenarios[i].prompt, "rank": int(ranks[r]),
                          "top": [emotions[c] for c in torch.argsort(-centred[r], stable=True)[:k3].tolist()]}
                         for r, i in enumerate(kept)],
    })
    out["plot"] = _plot_scenarios(out, layer, out_dir / "scenario_matrix.png")
    return out


def _plot_scenarios(s: Dict, layer: int, path: Path) -> str:
    values = np.asarray(s["matrix"]["values"])
    rows, columns = s["matrix"]["rows"], s["matrix"]["columns"]
    fig = _figure(0.32 * len(columns) + 3.2, 0.2 * len(rows) + 2.2)
    ax = fig.add_subplot()
    lim = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{e} #{i + 1}" for i, e in enumerate(rows)], fontsize=6)
    for r, emotion in enumerate(rows):  # the target of each row
        ax.add_patch(_rectangle(columns.index(emotion), r))
    ax.set_xlabel("emotion vector")
    ax.set_ylabel("scenario (its intended emotion)")
    ax.set_title(f"Implicit scenarios at layer {layer}: cosine, centred per emotion (boxes: intended emotion)\n"
                 f"top-1 {_fmt(s['top1'])} (chance {_fmt(s['chance_top1'])}), "
                 f"top-{SCENARIO_TOP} {_fmt(s[f'top{SCENARIO_TOP}'])} (chance {_fmt(s[f'chance_top{SCENARIO_TOP}'])})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _save(fig, path)


def _rectangle(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", lw=0.8)


# ----------------------------------------------------------------------------------------------------------------------
# 6. Intensity
# ----------------------------------------------------------------------------------------------------------------------


def intensity_scores(values: Sequence[float], cos: torch.Tensor, expected: int) -> Dict:
    """Spearman ρ between ``values`` (n,) and ``cos`` (n,) readouts, and whether it has the ``expected`` sign
    (+1 / -1). ``rho``, ``p`` and ``right`` are ``None`` (with a ``note``) when the readout is constant."""
    from scipy.stats import spearmanr

    y = np.asarray(cos, dtype=np.float64)
    if np.ptp(y) == 0:
        return {"rho": None, "p": None, "right": None, "note": "the readout is constant over the values"}
    result = spearmanr(np.asarray(values, dtype=np.float64), y)
    rho = float(result.statistic)
    return {"rho": rho, "p": float(result.pvalue), "right": None if rho == 0 else (rho > 0) == (expected > 0)}


def _sign_summary(pairs: List[Dict]) -> Dict:
    decided = [p for p in pairs if p["right"] is not None]
    n_right = sum(p["right"] for p in decided)
    signed = [p["rho"] * p["sign"] for p in pairs if p["rho"] is not None]
    return {"n_pairs": len(pairs), "n_decided": len(decided), "n_right": n_right,
            "share_right": n_right / len(decided) if decided else None,
            "sign_test_p": _binomial_p(n_right, len(decided), 0.5),
            "mean_signed_rho": float(np.mean(signed)) if signed else None}


def _intensity(bank: VectorBank, templates: List[IntensityTemplate], cos: List[torch.Tensor], slot: int, layer: int,
               out_dir: Path) -> Dict:
    skipped, per_layer_pairs = [], [[] for _ in bank.layers]
    pairs = []
    for t, c in zip(templates, cos):
        for emotion, sign in t.expected.items():
            if emotion not in bank.names:
                skipped.append({"template": t.name, "emotion": emotion})
                continue
            k = bank.index(emotion)
            for j in range(len(bank.layers)):
                per_layer_pairs[j].append({**intensity_scores(t.values, c[:, j, k], sign), "sign": sign})
            pairs.append({"template": t.name, "emotion": emotion, "expected": "+" if sign > 0 else "-", "sign": sign,
                          "values": list(t.values), "cosine": [float(x) for x in c[:, slot, k]],
                          **intensity_scores(t.values, c[:, slot, k], sign)})
    out: Dict = {"n_templates": len(templates), "skipped": skipped, "chance_share_right": 0.5,
                 "chance_mean_signed_rho": 0.0,
                 "measure": "Spearman rho between the number and the cosine of the activation at the last prompt "
                            "token with the emotion's vector; right = rho has the expected sign; sign test one-sided "
                            "against 0.5 over the pairs with rho != 0",
                 "pairs": pairs, **_sign_summary(pairs)}
    if not pairs:
        out["note"] = "no expected emotion of the templates is in the bank"
        return out
    layer_summaries = [_sign_summary(p) for p in per_layer_pairs]
    out["per_layer"] = {"layers": list(bank.layers),
                        "share_right": [s["share_right"] for s in layer_summaries],
                        "mean_signed_rho": [s["mean_signed_rho"] for s in layer_summaries]}
    out["plot"] = _plot_intensity(templates, pairs, layer, out_dir / "intensity.png")
    return out


def _plot_intensity(templates: List[IntensityTemplate], pairs: List[Dict], layer: int, path: Path) -> str:
    names = [t.name for t in templates if any(p["template"] == t.name for p in pairs)]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(3.1 * cols, 2.5 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i, p in enumerate(q for q in pairs if q["template"] == name):
            y = np.asarray(p["cosine"])
            ok = {True: "✓", False: "✗", None: "?"}[p["right"]]
            ax.plot(p["values"], y - y.mean(), marker="o", ms=3, color=f"C{i}",
                    label=f"{p['emotion']} ({p['expected']}) ρ={_fmt(p['rho'], 2)} {ok}")
        values = next(q["values"] for q in pairs if q["template"] == name)
        if values[0] > 0 and values[-1] / values[0] >= 20:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="best")
    fig.supxlabel("the number in the prompt", fontsize=8)
    fig.supylabel("cosine with the vector, minus its mean", fontsize=8)
    fig.suptitle(f"Intensity templates at layer {layer} (expected direction in brackets)", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Steering sanity check
# ----------------------------------------------------------------------------------------------------------------------


def _split_turn(tokenizer, user: str, prefix: str) -> Tuple[List[int], List[int]]:
    """Token ids of the probe's chat prompt, split into the part up to the end of the user's message and the
    assistant turn (every later token: the turn's markers and ``prefix``)."""
    text = chat_text(tokenizer, [{"role": "user", "content": user}], prefill=prefix)
    turn_start = text.rfind(user) + len(user)
    enc = _encode(tokenizer, text)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    cut = next((t for t, (s, e) in enumerate(offsets) if e > s and s >= turn_start), len(ids))
    if cut == 0 or cut == len(ids):
        raise ValueError(f"steering probe {user!r}: cannot find the assistant-turn tokens after the user's message "
                         f"in the rendered prompt {text!r}")
    return ids[:cut], ids[cut:]


def _word_tokens(tokenizer, prefix: str, names: Sequence[str]) -> Dict[str, Tuple[int, bool]]:
    """Emotion -> (the first token of its word after ``prefix``, whether the word is that token alone); emotions
    whose word yields no new token are left out."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = {}
    for name in names:
        ids = tokenizer(f"{prefix} {name}", add_special_tokens=False)["input_ids"]
        if ids[:len(base)] != base or len(ids) == len(base):
            continue  # the word merged with the prefix's last token: no clean next token
        out[name] = (ids[len(base)], len(ids) == len(base) + 1)
    return out


def _candidates(tokenizer, bank: VectorBank, probes) -> Tuple[List[str], List[List[int]], Dict]:
    """The emotions that take part (see the module docstring), their token id per probe, and who was left out."""
    per_probe = [_word_tokens(tokenizer, prefix, bank.names) for _, prefix in probes]
    shared, missing = set(), set(bank.names)
    for words in per_probe:
        missing -= set(words)
        firsts: Dict[int, List[str]] = {}
        for name, (tok, _) in words.items():
            firsts.setdefault(tok, []).append(name)
        shared |= {n for group in firsts.values() if len(group) > 1 for n in group}
    names = [n for n in bank.names if n not in shared and all(n in w for w in per_probe)]
    ids = [[w[n][0] for n in names] for w in per_probe]
    info = {"single_token": [n for n in names if all(w[n][1] for w in per_probe)],
            "excluded_shared_first_token": sorted(shared),
            "excluded_no_token": sorted(missing - shared)}
    return names, ids, info


def _cache_arg(model) -> str:
    # transformers renamed the cache argument and output field (past_key_values -> cache); take whichever exists
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_logprobs(model, prefix_cache, turn: List[int], batch: int) -> torch.Tensor:
    """(batch, V) float32 next-token log-probabilities after ``turn`` fed on a copy of the shared prefix's cache."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([turn] * batch, device=device)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_arg(model): cache}).logits[:, -1]
    return logits.float().log_softmax(-1).cpu()


def _rank_rises(rise: torch.Tensor) -> torch.Tensor:
    """(N, N) rises (row: steered emotion, column: word) -> (N,) 1-based rank of each row's own word."""
    own = rise.diagonal()
    return 1 + (rise > own[:, None]).sum(1)


def _rank_summary(ranks: torch.Tensor, single: torch.Tensor) -> Dict:
    k = min(STEERING_TOP, len(ranks))
    out = {"top1": float((ranks == 1).double().mean()), f"top{STEERING_TOP}": float((ranks <= k).double().mean()),
           "mean_rank": float(ranks.double().mean())}
    if bool(single.any()):
        r = ranks[single]
        out["single_token_words"] = {"n": int(single.sum()), "top1": float((r == 1).double().mean()),
                                     f"top{STEERING_TOP}": float((r <= k).double().mean()),
                                     "mean_rank": float(r.double().mean())}
    return out


def _sweep_layers(bank: VectorBank, steer_layer: int) -> List[int]:
    layers = bank.layers
    if len(layers) <= MAX_SWEEP_LAYERS:
        return list(layers)
    picks = {layers[round(i * (len(layers) - 1) / (MAX_SWEEP_LAYERS - 2))] for i in range(MAX_SWEEP_LAYERS - 1)}
    return sorted(picks | {steer_layer})


def _steering(model, tokenizer, bank: VectorBank, prompts: SanityPrompts, strengths: Sequence[float],
              steer_layer: int, leak_emotions: List[str], out_dir: Path, progress: bool) -> Dict:
    import emokern
    from emokern.extraction.emotion_words import find_emotion_word

    names, token_ids, info = _candidates(tokenizer, bank, prompts.probes)
    N = len(names)
    out: Dict = {"layer": steer_layer, "layer_rule": "the bank's two-thirds layer (VectorBank.two_thirds_layer)",
                 "strengths": list(strengths), "scope": "the assistant-turn tokens (every token after the user's "
                 "message: the turn's markers and the reply's start)",
                 "probes": [{"user": u, "prefix": p} for u, p in prompts.probes], "n_candidates": N,
                 "candidates": names, **info}
    if N < 2:
        out["note"] = f"needs at least 2 emotions whose words have distinct first tokens; got {N}"
        return out
    middle = strengths[len(strengths) // 2]
    sweep = _sweep_layers(bank, steer_layer)
    chunks = [list(range(a, min(a + STEER_BATCH, N))) for a in range(0, N, STEER_BATCH)]
    leak_rows = [leak_emotions[a:a + STEER_BATCH] for a in range(0, len(leak_emotions), STEER_BATCH)]
    runs = [(s, steer_layer) for s in strengths] + [(middle, layer) for layer in sweep if layer != steer_layer]
    bar = progress_bar(len(runs) * len(prompts.probes) * len(chunks) + len(leak_rows) + 1, desc="steering sanity",
                       enabled=progress, unit="batch")
    device = model.get_input_embeddings().weight.device
    split = [_split_turn(tokenizer, user, prefix) for user, prefix in prompts.probes]
    with torch.inference_mode():
        base_logp, caches = [], []
        for head, turn in split:
            first = model(input_ids=torch.tensor([head], device=device), use_cache=True, logits_to_keep=1)
            caches.append(getattr(first, _cache_arg(model)))
            # unsteered by the same cached path as the steered rows, so that a rise is the steering's alone
            base_logp.append(_next_logprobs(model, caches[-1], turn, 1)[0])
        rises: Dict[Tuple[float, int], torch.Tensor] = {}
        handle = emokern.patch(model, bank, layers=sorted(set(sweep) | {steer_layer}), monitor=False,
                               tokenizer=tokenizer)
        try:
            for strength, layer in runs:
                rise = torch.zeros(N, N, dtype=torch.float64)
                for p, ((_, turn), cache) in enumerate(zip(split, caches)):
                    ids = torch.tensor(token_ids[p])
                    for rows in chunks:
                        handle.clear_steering()
                        for r, e in enumerate(rows):
                            handle.steer({names[e]: strength}, sequences=[r], layers=[layer])
                        logp = _next_logprobs(model, cache, turn, len(rows))
                        rise[rows] += (logp[:, ids] - base_logp[p][ids]).double()
                        bar.update(1)
                rises[(strength, layer)] = rise / len(split)
            # leak check: every token steered (prompt and answer), greedy
            leak_text = chat_text(tokenizer, [{"role": "user", "content": prompts.leak_user}])
            handle.clear_steering()
            unsteered = handle.generate([leak_text], max_new_tokens=prompts.leak_tokens, do_sample=False).texts[0]
            bar.update(1)
            steered = []
            for rows in leak_rows:
                handle.clear_steering()
                for r, emotion in enumerate(rows):
                    handle.steer({emotion: middle}, sequences=[r], layers=[steer_layer])
                steered += handle.generate([leak_text] * len(rows), max_new_tokens=prompts.leak_tokens,
                                           do_sample=False).texts
                bar.update(1)
        finally:
            handle.remove()
            bar.close()

    single = torch.tensor([n in info["single_token"] for n in names])
    by_strength = []
    for strength in strengths:
        rise = rises[(strength, steer_layer)]
        ranks = _rank_rises(rise)
        off = ~torch.eye(N, dtype=torch.bool)
        by_strength.append({"strength": strength, **_rank_summary(ranks, single),
                            "own_rise_mean": float(rise.diagonal().mean()),
                            "other_rise_mean": float(rise[off].mean()),
                            "ranks": dict(zip(names, ranks.tolist()))})
    sweep_ranks = {layer: _rank_rises(rises[(middle, layer)]) for layer in sweep}
    named = [bool(find_emotion_word(text, e)) for e, text in zip(leak_emotions, steered)]
    named_unsteered = [bool(find_emotion_word(unsteered, e)) for e in leak_emotions]
    out.update({
        "chance_top1": 1 / N, f"chance_top{STEERING_TOP}": min(STEERING_TOP, N) / N, "chance_mean_rank": (N + 1) / 2,
        "rise": "steered minus unsteered next-token log-probability of the word's first token, mean over the probes",
        "by_strength": by_strength,
        "per_layer": {"strength": middle, "layers": sweep,
                      "top1": [float((sweep_ranks[x] == 1).double().mean()) for x in sweep],
                      f"top{STEERING_TOP}": [float((sweep_ranks[x] <= min(STEERING_TOP, N)).double().mean())
                                             for x in sweep]},
        "leak": {"user": prompts.leak_user, "strength": middle, "layer": steer_layer, "scope": "every token",
                 "max_new_tokens": prompts.leak_tokens, "decoding": "greedy", "emotions": leak_emotions,
                 "n": len(leak_emotions),
                 "steered_share_naming_own_emotion": float(np.mean(named)) if named else None,
                 "unsteered_share_of_emotions_named": float(np.mean(named_unsteered)) if named else None,
                 "unsteered_text": unsteered,
                 "steered_naming_own_emotion": [e for e, hit in zip(leak_emotions, named) if hit],
                 "steered_texts": dict(zip(leak_emotions, steered))},
    })
    out["plot"] = _plot_steering(out, out_dir / "steering_ranks.png")
    return out


def _plot_steering(s: Dict, path: Path) -> str:
    N = s["n_candidates"]
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    grid = np.arange(1, N + 1)
    for i, row in enumerate(s["by_strength"]):
        ranks = np.sort(np.asarray(list(row["ranks"].values())))
        share = np.searchsorted(ranks, grid, side="right") / N
        ax.step(grid, share, where="post", color=f"C{i}",
                label=f"strength {row['strength']:g}: top-1 {_fmt(row['top1'])}, mean rank {row['mean_rank']:.1f}")
    ax.plot(grid, grid / N, color="grey", ls=":", lw=1, label=f"chance (mean rank {(N + 1) / 2:.1f})")
    if N > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"rank of the steered emotion's own word among {N} emotion words (1 = rose most)")
    ax.set_ylabel("share of steered emotions with rank ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Steering sanity check at layer {s['layer']}: rank of the own word's log-prob rise", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# The three sections together
# ----------------------------------------------------------------------------------------------------------------------


def _plot_layers(scenarios: Dict, intensity: Dict, steering: Dict, layer: int, path: Path) -> Optional[str]:
    panels = [p for p in (("scenarios", scenarios), ("intensity", intensity), ("steering", steering))
              if p[1].get("per_layer")]
    if not panels:
        return None
    fig = _figure(4.0 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, sec) in zip(axes, panels):
        curve = sec["per_layer"]
        if name == "scenarios":
            ax.plot(curve["layers"], curve["top1"], marker="o", ms=2, label="top-1")
            ax.plot(curve["layers"], curve[f"top{SCENARIO_TOP}"], marker="o", ms=2, label=f"top-{SCENARIO_TOP}")
            ax.axhline(sec["chance_top1"], color="C0", ls=":", lw=1, label="chance top-1")
            ax.axhline(sec[f"chance_top{SCENARIO_TOP}"], color="C1", ls=":", lw=1, label=f"chance top-{SCENARIO_TOP}")
            ax.set_title("Implicit scenarios", fontsize=9)
            ax.axvline(layer, color="crimson", ls="--", lw=1, label=f"report layer {layer}")
        elif name == "intensity":
            share = [np.nan if x is None else x for x in curve["share_right"]]
            rho = [np.nan if x is None else x for x in curve["mean_signed_rho"]]
            ax.plot(curve["layers"], share, marker="o", ms=2, label="share in the expected direction")
            ax.plot(curve["layers"], rho, marker="o", ms=2, label="mean signed ρ")
            ax.axhline(0.5, color="C0", ls=":", lw=1, label="chance share (0.5)")
            ax.axhline(0.0, color="C1", ls=":", lw=1, label="chance ρ (0)")
            ax.set_title("Intensity templates", fontsize=9)
            ax.axvline(layer, color="crimson", ls="--", lw=1, label=f"report layer {layer}")
        else:
            ax.plot(curve["layers"], curve["top1"], marker="o", ms=3, label="top-1")
            ax.plot(curve["layers"], curve[f"top{STEERING_TOP}"], marker="o", ms=3, label=f"top-{STEERING_TOP}")
            ax.axhline(sec["chance_top1"], color="C0", ls=":", lw=1, label="chance top-1")
            ax.axhline(sec[f"chance_top{STEERING_TOP}"], color="C1", ls=":", lw=1,
                       label=f"chance top-{STEERING_TOP}")
            ax.axvline(sec["layer"], color="crimson", ls="--", lw=1, label=f"steering layer {sec['layer']}")
            ax.set_title(f"Steering sanity (strength {curve['strength']:g}), by steered layer", fontsize=9)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylim(-1.02 if name == "intensity" else 0, 1.02)  # a signed rho spans [-1, 1]
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def validation_sections(bank: VectorBank, model, tokenizer, out_dir: Path, *, layer: int,
                        scenarios: List[Scenario], templates: List[IntensityTemplate], sanity: SanityPrompts,
                        strengths: Sequence[float] = STEERING_STRENGTHS, steer_layer: Optional[int] = None,
                        progress: bool = True) -> Dict:
    """Sections 5-7 (see the module docstring), with their plots written into ``out_dir``.

    Args:
        bank, model, tokenizer: as for :func:`emokern.validation.report.validation_report` (already checked against each other).
        layer: the report's layer (one of ``bank.layers``), where scenarios and intensity are read.
        scenarios, templates, sanity: the loaded data files (:func:`load_scenarios`, :func:`load_intensity`,
            :func:`load_sanity_prompts`).
        strengths: steering strengths (fractions of the steering layer's mean residual norm), at least one, finite
            and non-zero; the leak check and the layer sweep use the middle one.
        steer_layer: where to steer (default: :meth:`VectorBank.two_thirds_layer`); one of ``bank.layers``.

    Returns:
        ``{"scenarios", "intensity", "steering", "layers_plot"}``; numbers that cannot be computed are ``None`` with
        a ``note``.
    """
    strengths = [float(s) for s in strengths]
    if not strengths or any(not np.isfinite(s) or s == 0 for s in strengths):
        raise ValueError(f"strengths: expected at least one finite, non-zero steering strength; got {strengths}")
    steer_layer = bank.two_thirds_layer() if steer_layer is None else steer_layer
    if steer_layer not in bank.layers:
        raise ValueError(f"steer_layer: expected one of the bank's layers {bank.layers}; got {steer_layer}")
    slot = bank.layer_slot(layer)
    prompts = [s.prompt for s in scenarios] + [p for t in templates for p in t.prompts()]
    states = last_token_states(model, tokenizer, prompts, bank.layers, progress=progress,
                               desc="scenarios and intensity")
    cos = _cosines(states, bank.vectors)  # (n, L, K)
    n = len(scenarios)
    per_template, at = [], n
    for t in templates:
        per_template.append(cos[at:at + len(t.values)])
        at += len(t.values)
    scen = _scenarios(bank, scenarios, cos[:n], slot, layer, out_dir)
    inten = _intensity(bank, templates, per_template, slot, layer, out_dir)
    leak_emotions = list(dict.fromkeys(s.emotion for s in scenarios if s.emotion in bank.names))
    steer = _steering(model, tokenizer, bank, sanity, strengths, steer_layer, leak_emotions, out_dir, progress)
    return {"scenarios": scen, "intensity": inten, "steering": steer,
            "layers_plot": _plot_layers(scen, inten, steer, layer, out_dir / "validation_layers.png")}


def key_numbers(report: Dict) -> Dict:
    """The headline numbers of sections 5-7 with their chance levels (missing ones left out)."""
    s, i, t = report.get("scenarios") or {}, report.get("intensity") or {}, report.get("steering") or {}
    picks = {
        "scenario_top1": s.get("top1"), "scenario_chance_top1": s.get("chance_top1"),
        "scenario_top3": s.get(f"top{SCENARIO_TOP}"), "scenario_chance_top3": s.get(f"chance_top{SCENARIO_TOP}"),
        "intensity_share_right": i.get("share_right"), "intensity_sign_test_p": i.get("sign_test_p"),
        "intensity_n_right": i.get("n_right"), "intensity_n_pairs": i.get("n_decided"),
        "intensity_mean_signed_rho": i.get("mean_signed_rho"),
        "steering_layer": t.get("layer"), "steering_n_words": t.get("n_candidates"),
        "steering_chance_top1": t.get("chance_top1"), "steering_chance_top5": t.get(f"chance_top{STEERING_TOP}"),
        "steering_chance_mean_rank": t.get("chance_mean_rank"),
    }
    for row in t.get("by_strength") or []:
        picks[f"steering_top1_at_{row['strength']:g}"] = row["top1"]
        picks[f"steering_top5_at_{row['strength']:g}"] = row[f"top{STEERING_TOP}"]
        picks[f"steering_mean_rank_at_{row['strength']:g}"] = row["mean_rank"]
    leak = t.get("leak") or {}
    picks["leak_steered_share"] = leak.get("steered_share_naming_own_emotion")
    picks["leak_unsteered_share"] = leak.get("unsteered_share_of_emotions_named")
    return {k: v for k, v in picks.items() if v is not None}


def summary_line(report: Dict) -> str:
    """One line with the three new headline numbers and their chance levels (what ``emokern report`` and
    ``emokern demo`` print)."""
    k = key_numbers(report)
    parts = []
    if "scenario_top1" in k:
        parts.append(f"implicit scenarios top-1 {_fmt(k['scenario_top1'])} / top-3 {_fmt(k['scenario_top3'])} "
                     f"(chance {_fmt(k['scenario_chance_top1'])} / {_fmt(k['scenario_chance_top3'])})")
    if "intensity_share_right" in k:
        parts.append(f"intensity {k['intensity_n_right']}/{k['intensity_n_pairs']} "
                     f"in the expected direction ({_fmt(k['intensity_share_right'])}, chance 0.5, sign test p = "
                     f"{k['intensity_sign_test_p']:.2g})")
    rows = (report.get("steering") or {}).get("by_strength") or []
    if rows:
        best = rows[-1]
        parts.append(f"steering own-word top-1 {_fmt(best['top1'])} / top-5 {_fmt(best['top5'])} at strength "
                     f"{best['strength']:g} (chance {_fmt(k['steering_chance_top1'])} / "
                     f"{_fmt(k['steering_chance_top5'])}, {k['steering_n_words']} words)")
    return "; ".join(parts) if parts else "sections 5-7: nothing computed"


# ----------------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------------


def _p(x) -> str:
    return "—" if x is None else f"{x:.2g}"


def validation_html(report: Dict, out_dir: Path) -> str:
    """The page's sections 5-7 (HTML fragments joined), from ``report['scenarios' | 'intensity' | 'steering']``."""
    s, i, t = report["scenarios"], report["intensity"], report["steering"]
    left_out = f"; left out (not in the bank): {_e(', '.join(s['skipped_emotions']))}" if s["skipped_emotions"] else ""
    parts = ["<h2>5. Implicit scenarios</h2>",
             f"<p class='note'>{_e(s['measure'])}; read at layer {report['layer']['index']}. "
             f"{s['n_scenarios']} scenarios over {s['n_emotions']} emotions{left_out}.</p>"]
    if s.get("note"):
        parts.append(f"<p class='note'>{_e(s['note'])}</p>")
    else:
        parts.append(_table(["measure", "centred (main)", "uncentred", "chance"], [
            ["top-1", s["top1"], s["uncentred"]["top1"], s["chance_top1"]],
            [f"top-{SCENARIO_TOP}", s[f"top{SCENARIO_TOP}"], s["uncentred"][f"top{SCENARIO_TOP}"],
             s[f"chance_top{SCENARIO_TOP}"]],
            ["mean rank", s["mean_rank"], s["uncentred"]["mean_rank"], s["chance_mean_rank"]]]))
        parts.append(f"<p>Top-1 binomial p (one-sided, against chance) = {_p(s['top1_binomial_p'])}.</p>")
        parts.append(_img(out_dir, s.get("plot"), "Scenario × emotion cosine, centred per emotion"))
        parts.append("<details><summary>per scenario</summary>" + _table(
            ["emotion", "prompt", "rank", f"top {SCENARIO_TOP}"],
            [[_e(r["emotion"]), _e(r["prompt"]), r["rank"], _e(", ".join(r["top"]))] for r in s["per_scenario"]])
            + "</details>")

    parts += ["<h2>6. Intensity templates</h2>", f"<p class='note'>{_e(i['measure'])}.</p>"]
    if i.get("note"):
        parts.append(f"<p class='note'>{_e(i['note'])}</p>")
    else:
        parts.append(f"<p>{i['n_right']} of {i['n_decided']} (template, emotion) pairs move in the expected "
                     f"direction: share {_fmt(i['share_right'])} (chance 0.5), sign test p = {_p(i['sign_test_p'])}; "
                     f"mean signed ρ = {_fmt(i['mean_signed_rho'])} (chance 0).</p>")
        parts.append(_img(out_dir, i.get("plot"), "Cosine vs the number, per template"))
        parts.append(_table(["template", "emotion", "expected", "Spearman ρ", "p", "right"],
                            [[_e(p["template"]), _e(p["emotion"]), p["expected"], p["rho"], p["p"],
                              {True: "yes", False: "no", None: "—"}[p["right"]]] for p in i["pairs"]]))

    parts += ["<h2>7. Steering sanity check</h2>"]
    if t.get("note"):
        parts.append(f"<p class='note'>{_e(t['note'])}</p>")
    else:
        probes = "; ".join(f"“{p['user']}” → “{p['prefix']} …”" for p in t["probes"])
        parts.append(f"<p class='note'>Steered at layer {t['layer']} ({_e(t['layer_rule'])}) on {_e(t['scope'])}; "
                     f"probes: {_e(probes)}. Rise: {_e(t['rise'])}. {t['n_candidates']} emotions take part "
                     f"({len(t['single_token'])} one-token words); left out for sharing a first token: "
                     f"{_e(', '.join(t['excluded_shared_first_token']) or 'none')}.</p>")
        rows = [[f"{r['strength']:g}", r["top1"], r[f"top{STEERING_TOP}"], r["mean_rank"],
                 (r.get("single_token_words") or {}).get("top1"), r["own_rise_mean"], r["other_rise_mean"]]
                for r in t["by_strength"]]
        rows.append(["chance", t["chance_top1"], t[f"chance_top{STEERING_TOP}"], t["chance_mean_rank"],
                     None, None, None])
        parts.append(_table(["strength", "top-1", f"top-{STEERING_TOP}", "mean rank", "top-1 (one-token words)",
                             "own word's mean rise", "other words' mean rise"], rows))
        parts.append(_img(out_dir, t.get("plot"), "Distribution of the own word's rank"))
        leak = t["leak"]
        parts.append(f"<h3>Leak check</h3><p>“{_e(leak['user'])}”, every token steered at strength "
                     f"{leak['strength']:g}, greedy, {leak['max_new_tokens']} tokens: "
                     f"{_fmt(leak['steered_share_naming_own_emotion'])} of the {leak['n']} steered answers name "
                     f"their steered emotion; the unsteered answer names "
                     f"{_fmt(leak['unsteered_share_of_emotions_named'])} of those emotions. "
                     f"Unsteered: <i>{_e(leak['unsteered_text'])}</i></p>")
        parts.append(_table(["steered toward", "names it", "answer"],
                            [[_e(e), "yes" if e in leak["steered_naming_own_emotion"] else "no", _e(text)]
                             for e, text in leak["steered_texts"].items()]))
    parts.append(_img(out_dir, report.get("validation_layers_plot"), "Sections 5-7 over layers"))
    return "\n".join(parts)
