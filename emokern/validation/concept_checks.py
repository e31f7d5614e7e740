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

The data files (:mod:`emokern.validation.concept_data`) can be replaced (``emokern report --scenarios / --intensity
/ --steering-prompts``). This module measures; the figures and the HTML are
:mod:`emokern.validation.concept_checks_page`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from emokern.core.bank import VectorBank
from emokern.core.chat import chat_text
from emokern.util.progress import progress_bar
from emokern.util.kv_cache import cache_argument
from emokern.util.stats import unit_rows
from emokern.validation.concept_checks_page import (concept_checks_by_layer_png, intensity_png, scenario_matrix_png,
                                                    steering_ranks_png)
from emokern.validation.concept_data import IntensityTemplate, SanityPrompts, Scenario
from emokern.validation.html import format_number

__all__ = [
    "SCENARIO_TOP",
    "STEERING_STRENGTHS",
    "STEERING_TOP",
    "intensity_scores",
    "key_numbers",
    "last_token_states",
    "scenario_ranks",
    "summary_line",
    "concept_check_sections",
]


#: Steering strengths of the sanity check, fractions of the steering layer's mean residual norm (the paper used 0.5
#: on a few tokens).
STEERING_STRENGTHS = (0.1, 0.25, 0.5)
#: The scenario check reports top-1 and top-SCENARIO_TOP, the steering check top-1 and top-STEERING_TOP (key names
#: of the report: ``top3``, ``top5``).
SCENARIO_TOP = 3
STEERING_TOP = 5
#: At most this many layers (the steering layer included) in the steering sweep; each costs a few batched forwards
#: (measured on SmolLM2-135M on 2 shared CPU cores: about 7 s per batch of 64 steered rows).
MAX_SWEEP_LAYERS = 4
#: Rows per batched steered forward.
STEER_BATCH = 64


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
    (:func:`emokern.core.chat.chat_text`). One prompt per forward, so no padding can shift a position."""
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
    return torch.einsum("nld,lkd->nlk", unit_rows(states.double()), unit_rows(vectors.double()))


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
    out["plot"] = scenario_matrix_png(out, layer, out_dir / "scenario_matrix.png", scenario_top=SCENARIO_TOP)
    return out


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
    out["plot"] = intensity_png(templates, pairs, layer, out_dir / "intensity.png")
    return out


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


def _next_logprobs(model, prefix_cache, turn: List[int], batch: int) -> torch.Tensor:
    """(batch, V) float32 next-token log-probabilities after ``turn`` fed on a copy of the shared prefix's cache."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([turn] * batch, device=device)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache}).logits[:, -1]
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
    from emokern.engines.hf import patch
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
            caches.append(getattr(first, cache_argument(model)))
            # unsteered by the same cached path as the steered rows, so that a rise is the steering's alone
            base_logp.append(_next_logprobs(model, caches[-1], turn, 1)[0])
        rises: Dict[Tuple[float, int], torch.Tensor] = {}
        handle = patch(model, bank, layers=sorted(set(sweep) | {steer_layer}), monitor=False,
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
    out["plot"] = steering_ranks_png(out, out_dir / "steering_ranks.png")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The three sections together
# ----------------------------------------------------------------------------------------------------------------------


def concept_check_sections(bank: VectorBank, model, tokenizer, out_dir: Path, *, layer: int,
                           scenarios: List[Scenario], templates: List[IntensityTemplate], sanity: SanityPrompts,
                           strengths: Sequence[float] = STEERING_STRENGTHS, steer_layer: Optional[int] = None,
                           progress: bool = True) -> Dict:
    """Sections 5-7 (see the module docstring), with their plots written into ``out_dir``.

    Args:
        bank, model, tokenizer: as for :func:`emokern.validation.report.validation_report` (already checked against each other).
        layer: the report's layer (one of ``bank.layers``), where scenarios and intensity are read.
        scenarios, templates, sanity: the loaded data files (:mod:`emokern.validation.concept_data`).
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
            "layers_plot": concept_checks_by_layer_png(scen, inten, steer, layer, out_dir / "validation_layers.png",
                                                       scenario_top=SCENARIO_TOP, steering_top=STEERING_TOP)}


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
        parts.append(f"implicit scenarios top-1 {format_number(k['scenario_top1'])} / top-3 "
                     f"{format_number(k['scenario_top3'])} (chance {format_number(k['scenario_chance_top1'])} / "
                     f"{format_number(k['scenario_chance_top3'])})")
    if "intensity_share_right" in k:
        parts.append(f"intensity {k['intensity_n_right']}/{k['intensity_n_pairs']} "
                     f"in the expected direction ({format_number(k['intensity_share_right'])}, chance 0.5, sign test "
                     f"p = {k['intensity_sign_test_p']:.2g})")
    rows = (report.get("steering") or {}).get("by_strength") or []
    if rows:
        best = rows[-1]
        parts.append(f"steering own-word top-1 {format_number(best['top1'])} / top-5 {format_number(best['top5'])} "
                     f"at strength {best['strength']:g} (chance {format_number(k['steering_chance_top1'])} / "
                     f"{format_number(k['steering_chance_top5'])}, {k['steering_n_words']} words)")
    return "; ".join(parts) if parts else "sections 5-7: nothing computed"
