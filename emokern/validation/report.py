"""``emokern report BANK``: a validation report of a :class:`~emokern.core.bank.VectorBank` (PAPER_NOTES §2).

:func:`validation_report` reads the bank at one layer and writes into an output folder:

* ``report.json`` — every number below;
* PNG plots — ``quality_curve.png`` (when the bank records a quality curve), ``pca_scatter.png``,
  ``cosine_matrix.png``, ``goemotions_auroc.png``, ``emobank_valence.png`` and those of sections 5-7;
* ``report.html`` — one self-contained page (inline CSS, the PNGs embedded as ``data:`` URIs, no external resource)
  that shows the numbers and the plots.

Sections:

1. **Held-out story classification.** The bank's own per-layer held-out measurements (``metadata["quality"]``,
   written by :func:`emokern.extraction.extract.extract_bank`; see :mod:`emokern.extraction.quality`): with whole premises held out, the
   test top-1/top-5 of the mean-difference vectors, the logistic-regression probe's top-1 (the ceiling of a linear
   readout) and the valence AUROC at the report layer, beside their chance levels, and the per-layer test and
   validation curves with the report layer marked; and, when ``corpus`` is given, top-1/top-5 accuracy on those
   stories at the report layer. Chance is 1/K (top-1) and min(5, K)/K (top-5), 0.5 for AUROC.
2. **Geometry.** PCA of the K unit vectors (scikit-learn): variance explained by PC1 and PC2, and Pearson r of PC1
   with human valence and of PC2 with human arousal over the emotions rated in ``data/norms`` (Glasgow Norms). PCA
   signs are arbitrary: PC1 is oriented so that r(PC1, valence) >= 0 and PC2 so that r(PC2, arousal) >= 0, so the
   reported r are magnitudes with PC1 pointing to positive valence (the paper: r = 0.81 and 0.66 with another human
   study of 45 emotions). k-means (k = 10, scikit-learn) clusters the vectors; a PC1×PC2 scatter coloured by
   cluster and the K×K cosine-similarity matrix ordered by cluster are drawn.
3. **Logit lens.** Each vector through the final norm's gain and the unembedding (see :func:`logit_lens`): the
   top-10 promoted and suppressed tokens, for every emotion in the JSON and for the featured ones in the page.
4. **External text.** GoEmotions test comments: AUROC of the matching emotion's projection for each label in
   :data:`GOEMOTIONS_TO_EMOTION` whose emotion is in the bank, and the top-5 comments per featured emotion.
   EmoBank test sentences: Pearson r between the valence readout (projection on the oriented PC1 direction) and
   human valence.
5-7. **Implicit scenarios, intensity templates, steering sanity check**, with chance levels and per-layer curves:
   see :mod:`emokern.validation.concept_checks` (plots ``scenario_matrix.png``, ``intensity.png``, ``steering_ranks.png``,
   ``validation_layers.png``).

Activations come from :func:`emokern.extraction.extract.story_activations` at the chosen layer: held-out stories as the bank
was built (its recorded ``fmt`` and ``first_token``), external texts in the bank's format too (with ``fmt="chat"``,
each text as the Assistant's reply, framed like the stories) averaged over all their own tokens (``first_token=0``).
Not as bare text: without a BOS token a bare text's first token is an attention sink whose residual stream is
hundreds of times larger than the rest in the middle layers, and in a short comment it dominates the mean (measured
on SmolLM2-135M: GoEmotions mean AUROC 0.50-0.55 and EmoBank r about 0.05 over layers 11-27 read bare, against
0.65-0.69 and 0.21-0.37 read in the chat frame).

This module computes the sections and writes ``report.json``; the figures and the page are
:mod:`emokern.validation.report_page`, sections 5-7 :mod:`emokern.validation.concept_checks`, and the ``emokern
report`` command :mod:`emokern.cli`. (About 600 lines: sections 1-4 share the layer reader and the report's one
dict.) scikit-learn, scipy and matplotlib are imported inside the functions that need them, so importing this module
stays light.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from emokern.core.architecture import get_module, text_config
from emokern.core.bank import VectorBank
from emokern.util.stats import pearson, pearson_p_value, unit_rows
from emokern.validation import concept_checks, concept_data
from emokern.validation.report_page import (cosine_matrix_png, emobank_valence_png, goemotions_auroc_png,
                                            pca_scatter_png, quality_curve_png, report_html)

__all__ = [
    "FEATURED_EMOTIONS",
    "GOEMOTIONS_TO_EMOTION",
    "GOEMOTIONS_UNMAPPED",
    "MIN_EMOTIONS",
    "logit_lens",
    "validation_report",
]

#: The twelve emotions featured in the paper's main figures; the page shows logit lens and snippets for those
#: present in the bank.
FEATURED_EMOTIONS = ("happy", "inspired", "loving", "proud", "calm", "desperate", "angry", "guilty", "sad", "afraid",
                     "nervous", "surprised")

#: GoEmotions label -> the emotion word of the paper's 171 that names the same state. Labels left out have no clear
#: counterpart among the 171: admiration (no "admiring"; awestruck is awe), approval, curiosity (no "curious"),
#: desire (infatuated / greedy / aroused are each narrower), disappointment (no "disappointed"; dispirited and
#: unhappy are broader), disapproval, realization (not an emotion) and neutral. caring -> compassionate follows
#: GoEmotions' definition of caring ("displaying kindness and concern for others"); confusion -> puzzled is the
#: closest everyday word for "lack of understanding, uncertainty" (bewildered / perplexed are stronger).
GOEMOTIONS_TO_EMOTION: Dict[str, str] = {
    "amusement": "amused",
    "anger": "angry",
    "annoyance": "annoyed",
    "caring": "compassionate",
    "confusion": "puzzled",
    "disgust": "disgusted",
    "embarrassment": "embarrassed",
    "excitement": "excited",
    "fear": "afraid",
    "gratitude": "grateful",
    "grief": "grief-stricken",
    "joy": "joyful",
    "love": "loving",
    "nervousness": "nervous",
    "optimism": "optimistic",
    "pride": "proud",
    "relief": "relieved",
    "remorse": "remorseful",
    "sadness": "sad",
    "surprise": "surprised",
}
#: The GoEmotions labels not in :data:`GOEMOTIONS_TO_EMOTION` (see the reasons above); they are not scored.
GOEMOTIONS_UNMAPPED = ("admiration", "approval", "curiosity", "desire", "disappointment", "disapproval", "realization",
                       "neutral")

N_CLUSTERS = 10  # the paper's k
#: k-means with k = 10 needs at least 10 vectors (which also covers PCA's 2 components).
MIN_EMOTIONS = N_CLUSTERS
KMEANS_SEED = 0
TOP_TOKENS = 10
TOP_SNIPPETS = 5
# A Pearson r over fewer points is ±1 or undefined.
MIN_CORRELATION_POINTS = 3

# The final norm of each family emokern patches (emokern.core.architecture.ARCHITECTURES), as a dotted path from the causal LM.
_FINAL_NORM = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "qwen3": "model.norm",
    "gemma3_text": "model.norm",
    "gemma3": "model.language_model.norm",
    "gpt2": "transformer.ln_f",
}

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _correlation(x: Sequence[float], y: Sequence[float]) -> Dict:
    """``{"r", "p", "n"}``: Pearson's r (:func:`emokern.util.stats.pearson`) and its two-sided p-value
    (:func:`emokern.util.stats.pearson_p_value`); r and p are ``None`` (with a ``note``) for fewer than
    :data:`MIN_CORRELATION_POINTS` points or a constant series."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    n = len(x)
    if n < MIN_CORRELATION_POINTS:
        return {"r": None, "p": None, "n": n, "note": f"needs at least {MIN_CORRELATION_POINTS} points; got {n}"}
    r = pearson(x, y, min_points=MIN_CORRELATION_POINTS)
    if r is None:
        return {"r": None, "p": None, "n": n, "note": "one of the series is constant"}
    return {"r": r, "p": pearson_p_value(r, n), "n": n}


# ----------------------------------------------------------------------------------------------------------------------
# Layer
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_layer(bank: VectorBank, model, layer: Optional[int]) -> Tuple[int, str]:
    """The model layer to report on and where it came from (see :func:`validation_report`)."""
    n_layers = int(text_config(model.config).num_hidden_layers)
    if layer is None:
        layer, source = bank.default_layer()
    elif isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer: expected an int (a decoder-layer index) or None; got {layer!r}")
    else:
        source = "the layer argument"
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: expected a decoder-layer index in [0, {n_layers}) for this {n_layers}-layer model, "
                         f"among the bank's layers {bank.layers}; got {layer} (from {source})")
    if layer not in bank.layers:
        raise ValueError(f"layer: expected one of the bank's layers {bank.layers}; got {layer} (from {source})")
    return layer, source


def _layer_means(model, tokenizer, layer: int, batch_size: int, progress: bool) -> Callable[..., torch.Tensor]:
    """``read(texts, fmt, first_token)``: (n, d) float32 per-text mean activations at ``layer``, from
    :func:`emokern.extraction.extract.story_activations`."""
    from emokern.extraction.extract import story_activations

    def read(texts: List[str], fmt: str, first_token: int) -> torch.Tensor:
        means, _ = story_activations(model, tokenizer, texts, layers=[layer], first_token=first_token, fmt=fmt,
                                     batch_size=batch_size, progress=progress)
        return means[:, 0]

    return read


# ----------------------------------------------------------------------------------------------------------------------
# 1. Held-out story classification
# ----------------------------------------------------------------------------------------------------------------------


def _corpus_pairs(corpus, names: List[str]) -> Tuple[List[str], List[str]]:
    """``(texts, labels)`` of the corpus, checked: one label per text, at least one label among ``names``."""
    if hasattr(corpus, "stories"):
        stories = list(corpus.stories)
        texts, labels = [s.text for s in stories], [s.emotion for s in stories]
    elif isinstance(corpus, (tuple, list)) and len(corpus) == 2:
        texts, labels = list(corpus[0]), list(corpus[1])
        if len(texts) != len(labels):
            raise ValueError(f"corpus: expected one label per text; got {len(texts)} texts and {len(labels)} labels")
    else:
        raise TypeError(f"corpus: expected an object with .stories (records with .text and .emotion, e.g. "
                        f"StoryCorpus) or a (texts, labels) pair; got {type(corpus).__name__}")
    if not set(labels) & set(names):
        raise ValueError(f"corpus: expected stories labelled with the bank's emotions; none of its {len(labels)} "
                         f"labels is (some labels: {sorted(set(labels))[:10]})")
    return texts, labels


def _classification(bank: VectorBank, layer: int, stories: Optional[Tuple[List[str], List[str]]], read,
                    out_dir: Path) -> Dict:
    K = len(bank.names)
    k5 = min(5, K)
    out: Dict = {"chance_top1": 1 / K, "chance_top5": k5 / K, "quality_curve": None, "corpus": None}

    quality = bank.metadata.get("quality")
    if quality:
        at = quality["layers"].index(layer) if layer in quality["layers"] else None

        def pick(key):
            values = quality.get(key)
            return None if at is None or values is None else values[at]

        default = bank.metadata.get("default_layer") or {}
        out["quality_curve"] = {
            "split": quality.get("split", "stories"),
            "layers": list(quality["layers"]), "top1": list(quality["top1"]), "top5": list(quality["top5"]),
            "validation_top1": quality.get("validation_top1"), "validation_top5": quality.get("validation_top5"),
            "valence_auroc": quality.get("valence_auroc"),
            "probe_top1": quality.get("probe_top1"),
            "n_train": quality.get("n_train"), "n_validation": quality.get("n_validation"),
            "n_test": quality.get("n_test"), "premises": quality.get("premises"),
            "top1_at_layer": pick("top1"), "top5_at_layer": pick("top5"),
            "valence_auroc_at_layer": pick("valence_auroc"),
            "probe_top1_at_layer": (quality.get("probe_top1") or {}).get(str(layer)),
            "chosen_layer": default.get("chosen") if isinstance(default, dict) else None,
            "layer_rule": default.get("rule") if isinstance(default, dict) else None,
        }
        out["plot"] = quality_curve_png(out["quality_curve"], layer, K, out_dir / "quality_curve.png")

    if stories is not None:
        texts, labels = stories
        keep = [i for i, label in enumerate(labels) if label in bank.names]
        recipe = bank.metadata.get("recipe") or {}
        fmt, first_token = recipe.get("fmt", "chat"), int(recipe.get("first_token", 50))
        acts = read([texts[i] for i in keep], fmt, first_token).double()
        center = bank.extra.get("center")
        if center is not None:
            acts = acts - center[bank.layer_slot(layer)].double()
            centering = "the bank's extra['center'] (mean of the emotion means) subtracted, as in held_out_accuracy"
        else:
            acts = acts - acts.mean(0)
            centering = "the mean over the corpus texts subtracted (the bank has no extra['center'])"
        scores = acts @ bank.vectors[bank.layer_slot(layer)].double().T  # (n, K)
        truth = torch.tensor([bank.names.index(labels[i]) for i in keep])
        top = scores.topk(k5, dim=1).indices
        out["corpus"] = {
            "n": len(keep), "n_excluded": len(labels) - len(keep), "fmt": fmt, "first_token": first_token,
            "centering": centering,
            "top1": float((top[:, 0] == truth).double().mean()),
            "top5": float((top == truth[:, None]).any(1).double().mean()),
        }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 2. Geometry
# ----------------------------------------------------------------------------------------------------------------------


def _geometry(vectors: torch.Tensor, names: List[str], norms, out_dir: Path) -> Tuple[Dict, Optional[np.ndarray]]:
    """The geometry section and the unit valence direction (oriented PC1; ``None`` when it cannot be oriented)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    X = vectors.double().numpy()
    # The exact solver: with more than 500 features scikit-learn's "auto" would pick a randomized SVD.
    pca = PCA(n_components=2, svd_solver="full").fit(X)
    scores = pca.transform(X)  # (K, 2)
    rated = [(k, norms[name]) for k, name in enumerate(names) if name in norms]
    strict = [(k, n) for k, n in rated if n.match != "derived"]

    def correlate(pairs, pc: int, attr: str) -> Dict:
        return _correlation([scores[k, pc] for k, _ in pairs], [getattr(n, attr) for _, n in pairs])

    signs = []
    for pc, attr in ((0, "valence"), (1, "arousal")):
        r = correlate(rated, pc, attr)["r"]
        signs.append(-1.0 if r is not None and r < 0 else 1.0)
    scores = scores * np.array(signs)
    components = pca.components_ * np.array(signs)[:, None]
    can_orient = correlate(rated, 0, "valence")["r"] is not None

    kmeans = KMeans(n_clusters=N_CLUSTERS, random_state=KMEANS_SEED, n_init=10).fit(X)
    # Clusters are numbered 1..10 by decreasing mean PC1 (positive valence first when PC1 is oriented), as the
    # paper orders its table; members by decreasing PC1.
    raw_ids = sorted(range(N_CLUSTERS), key=lambda c: -scores[kmeans.labels_ == c, 0].mean())
    cluster_of = np.empty(len(names), dtype=int)
    clusters = []
    for number, c in enumerate(raw_ids, start=1):
        members = sorted(np.flatnonzero(kmeans.labels_ == c), key=lambda k: -scores[k, 0])
        cluster_of[members] = number
        clusters.append({"cluster": number, "size": len(members), "mean_pc1": float(scores[members, 0].mean()),
                         "members": [names[k] for k in members]})
    order = [names.index(m) for c in clusters for m in c["members"]]
    unit = unit_rows(torch.from_numpy(X)).numpy()
    cosine = (unit @ unit.T)[np.ix_(order, order)]  # rows and columns in cluster order

    geometry = {
        "n_emotions": len(names),
        "variance_explained": {"pc1": float(pca.explained_variance_ratio_[0]),
                               "pc2": float(pca.explained_variance_ratio_[1])},
        "orientation": ("PCA signs are arbitrary: PC1 is oriented so that r(PC1, valence) >= 0 (PC1 points to "
                        "positive valence) and PC2 so that r(PC2, arousal) >= 0; the reported r are therefore >= 0"
                        if can_orient else
                        f"not oriented: fewer than {MIN_CORRELATION_POINTS} of the bank's emotions have human norms"),
        "oriented": can_orient,
        "pc1_valence": correlate(rated, 0, "valence"),
        "pc2_arousal": correlate(rated, 1, "arousal"),
        "pc1_valence_strict": correlate(strict, 0, "valence"),
        "pc2_arousal_strict": correlate(strict, 1, "arousal"),
        "norms": ("Glasgow Norms (Scott et al. 2019, CC BY 4.0), emokern/data/norms; 'strict' drops words matched "
                  "through a derived headword (e.g. loving -> love)"),
        "paper": {"pc1_variance": 0.26, "pc2_variance": 0.15, "pc1_valence_r": 0.81, "pc2_arousal_r": 0.66,
                  "n_emotions_rated": 45},
        "kmeans": {"k": N_CLUSTERS, "random_state": KMEANS_SEED, "n_init": 10, "inertia": float(kmeans.inertia_),
                   "input": "the K unit vectors at the report layer"},
        "clusters": clusters,
        "emotions": [{"name": name, "pc1": float(scores[k, 0]), "pc2": float(scores[k, 1]),
                      "cluster": int(cluster_of[k]),
                      "valence": norms[name].valence if name in norms else None,
                      "arousal": norms[name].arousal if name in norms else None}
                     for k, name in enumerate(names)],
        "cosine": {"order": [names[k] for k in order], "matrix": np.round(cosine, 4).tolist()},
        "plots": {
            "pca_scatter": pca_scatter_png(scores, names, cluster_of, pca.explained_variance_ratio_, can_orient,
                                           out_dir / "pca_scatter.png", n_clusters=N_CLUSTERS),
            "cosine_matrix": cosine_matrix_png(cosine, [names[k] for k in order],
                                          [c["size"] for c in clusters], out_dir / "cosine_matrix.png"),
        },
    }
    return geometry, (components[0] if can_orient else None)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Logit lens
# ----------------------------------------------------------------------------------------------------------------------


def _final_norm(model) -> Tuple[str, torch.nn.Module]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FINAL_NORM:
        raise ValueError(f"model: expected a model_type with a known final norm ({', '.join(sorted(_FINAL_NORM))}) "
                         f"for the logit lens; got {model_type!r}")
    return _FINAL_NORM[model_type], get_module(model, _FINAL_NORM[model_type])


def logit_lens(vectors: torch.Tensor, model, tokenizer, *, k: int = TOP_TOKENS) -> Tuple[List[Dict], str]:
    """Top-``k`` promoted and suppressed tokens of each vector read through the model's unembedding.

    A direction ``v`` added to the last residual stream reaches the logits through the final norm and the LM head.
    The norm's division by the RMS (or standard deviation) of the whole hidden state is a positive scalar that does
    not change which tokens rank highest, so it is dropped; its elementwise gain is kept:

    * RMSNorm-type norms (Llama, Mistral, Qwen, Gemma): ``g = norm(1)``, the norm applied to the all-ones vector,
      which is ``weight`` (or ``1 + weight`` for Gemma) up to the factor 1/sqrt(1 + eps);
    * ``torch.nn.LayerNorm`` (GPT-2): ``v`` is first centred (LayerNorm subtracts the mean), then ``g = weight``;
      the bias adds the same logits for every vector and is left out.

    The logit effect is ``W_U (g ⊙ v)`` with ``W_U = model.get_output_embeddings().weight`` (V, d), computed in
    float32. Logit values are per unit of ``v`` before the norm's scaling, so compare them within a vector.

    Args:
        vectors: (K, d) directions (e.g. one layer of a bank).
        model, tokenizer: the causal LM and its tokenizer (tokens are shown as ``tokenizer.decode([id])``, or as
            the raw token when that is only a partial UTF-8 character).
        k: tokens per list.

    Returns:
        ``(rows, method)``: one dict per vector with ``promoted`` and ``suppressed`` lists of ``{"token", "id",
        "logit"}`` (most promoted / most suppressed first), and a one-line description of the method used.
    """
    path, norm = _final_norm(model)
    W = model.get_output_embeddings().weight
    v = vectors.to(device=W.device, dtype=torch.float32)
    with torch.inference_mode():
        if isinstance(norm, torch.nn.LayerNorm):
            v = (v - v.mean(-1, keepdim=True)) * norm.weight.float()
            method = f"W_U (g * (v - mean(v))) with g = {path}.weight (LayerNorm)"
        else:
            gain = norm(torch.ones(1, v.shape[1], device=W.device, dtype=W.dtype)).float()[0]
            v = v * gain
            method = f"W_U (g * v) with g = {path}(ones) ({type(norm).__name__} gain)"
        logits = v @ W.float().T  # (K, V)
        top = logits.topk(k, dim=1)
        bottom = (-logits).topk(k, dim=1)

    def shown(i: int) -> str:
        text = tokenizer.decode([i])
        # A byte-level piece of a multi-byte character decodes to U+FFFD alone; its raw piece says more.
        return tokenizer.convert_ids_to_tokens(i) if "\ufffd" in text else text

    def tokens(ids, values, sign) -> List[Dict]:
        return [{"token": shown(i), "id": i, "logit": sign * float(x)} for i, x in zip(ids.tolist(), values.tolist())]

    rows = [{"promoted": tokens(top.indices[r], top.values[r], 1.0),
             "suppressed": tokens(bottom.indices[r], bottom.values[r], -1.0)} for r in range(len(vectors))]
    return rows, method


# ----------------------------------------------------------------------------------------------------------------------
# 4. External text
# ----------------------------------------------------------------------------------------------------------------------


def _external_fmt(bank: VectorBank, tokenizer) -> str:
    """How external texts are read: in the format the bank's stories were read in (see the module docstring).

    A bank that does not record its format is read in the chat frame when the tokenizer has a chat template and
    as bare text otherwise (a base model's bank, or a hand-made one)."""
    recorded = (bank.metadata.get("recipe") or {}).get("fmt")
    if recorded is not None:
        return recorded
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def _check_limit(argument: str, limit: Optional[int]) -> Optional[int]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{argument}: expected a positive int (texts to evaluate) or None (all); got {limit!r}")
    return limit


def _goemotions(bank: VectorBank, layer: int, featured: List[str], data: List, limit: Optional[int], read,
                out_dir: Path, fmt: str) -> Dict:
    from sklearn.metrics import roc_auc_score

    n_total = len(data)
    data = data[:limit]
    acts = read([x.text for x in data], fmt, 0)
    proj = (acts.double() @ bank.vectors[bank.layer_slot(layer)].double().T).numpy()  # (n, K)

    labels = {}
    for label, emotion in GOEMOTIONS_TO_EMOTION.items():
        y = np.array([label in x.labels for x in data])
        row = {"emotion": emotion, "n_pos": int(y.sum()), "n_neg": int((~y).sum()), "auroc": None}
        if emotion not in bank.names:
            row["note"] = "emotion not in the bank"
        elif y.all() or not y.any():
            row["note"] = f"no {'negative' if y.all() else 'positive'} text among the {len(data)} evaluated"
        else:
            row["auroc"] = float(roc_auc_score(y, proj[:, bank.index(emotion)]))
        labels[label] = row
    scored = [r["auroc"] for r in labels.values() if r["auroc"] is not None]

    snippets = {}
    for emotion in featured:
        column = proj[:, bank.index(emotion)]
        best = np.argsort(-column, kind="stable")[:TOP_SNIPPETS]
        snippets[emotion] = [{"text": data[i].text, "score": float(column[i]), "labels": list(data[i].labels)}
                             for i in best]
    out = {
        "split": "test", "n_texts": len(data), "n_available": n_total,
        "selection": "the first n_texts comments in file order" if limit is not None else "all comments",
        "readout": (f"per-comment mean activation ({fmt} format, all the comment's tokens) projected "
                    f"on the emotion's unit vector"),
        "mapping": GOEMOTIONS_TO_EMOTION,
        "unmapped": list(GOEMOTIONS_UNMAPPED),
        "labels": labels,
        "n_scored": len(scored),
        "mean_auroc": float(np.mean(scored)) if scored else None,
        "top_snippets": snippets,
    }
    if scored:
        out["plot"] = goemotions_auroc_png(labels, out_dir / "goemotions_auroc.png")
    return out


def _emobank(direction: Optional[np.ndarray], data: List, limit: Optional[int], read, out_dir: Path,
            fmt: str) -> Dict:
    out = {"split": "test", "n_available": len(data),
           "readout": f"per-sentence mean activation ({fmt} format, all the sentence's tokens) projected on the unit "
                      f"PC1 direction of the emotion vectors, oriented toward positive valence",
           "selection": "the first n sentences in file order" if limit is not None else "all sentences"}
    if direction is None:
        out.update(n=0, r=None, p=None, note="skipped: the valence direction could not be oriented (too few of the "
                                             "bank's emotions have human norms)")
        return out
    data = data[:limit]
    acts = read([x.text for x in data], fmt, 0)
    readout = acts.double().numpy() @ direction
    human = [x.valence for x in data]
    out.update(_correlation(readout, human))
    out["plot"] = emobank_valence_png(readout, human, out["r"], out_dir / "emobank_valence.png")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


def validation_report(bank: VectorBank, model, tokenizer, out_dir: PathLike, *, layer: Optional[int] = None,
                      corpus=None, goemotions_limit: Optional[int] = None, emobank_limit: Optional[int] = None,
                      progress: bool = True, batch_size: int = 32, data_dir: Optional[PathLike] = None,
                      scenarios: Optional[PathLike] = None, intensity: Optional[PathLike] = None,
                      steering_prompts: Optional[PathLike] = None,
                      steering_strengths: Optional[Sequence[float]] = None) -> Dict:
    """Validate ``bank`` on ``model`` at one layer and write ``report.json``, the PNG plots and ``report.html``.

    Args:
        bank: the vectors; it must hold at least :data:`MIN_EMOTIONS` (10) emotions, since k-means uses k = 10.
            ``bank.check_model(model)`` must pass (same hidden size and fingerprint).
        model, tokenizer: the causal LM the bank was made from and its fast tokenizer.
        out_dir: folder to write into (created if needed; files of the same names are replaced).
        layer: the decoder-layer index to report on (the output of decoder layer ``layer``, as in
            :func:`emokern.extraction.extract.story_activations`); it must be one of ``bank.layers``. Default:
            :meth:`VectorBank.default_layer` (the layer chosen on validation premises; for older banks the recorded
            two-thirds layer or an int ``default_layer``; else the bank layer at two thirds of its layer list).
        corpus: optional held-out stories for a direct top-1/top-5 accuracy at ``layer``: an object with
            ``.stories`` (records with ``.text`` and ``.emotion``, e.g. a StoryCorpus) or a ``(texts, labels)``
            pair. Stories whose emotion is not in the bank are left out (and counted). They are read as the bank
            was built (``metadata["recipe"]``'s ``fmt`` and ``first_token``, else ``"chat"`` and 50) and scored by
            ``v_k · (a − center)`` with the bank's ``extra["center"]`` (else the corpus mean), argmax over k.
        goemotions_limit, emobank_limit: evaluate only the first N test texts of each set (file order), for speed;
            ``None``: all (5,427 GoEmotions comments, 1,000 EmoBank sentences).
        progress: show progress bars while activations are computed.
        batch_size: texts per forward pass (GoEmotions and EmoBank texts are short, so 32 costs little memory and
            runs several times faster on a CPU than extraction's 8; lower it for long corpus stories on a big model).
        data_dir: folder holding ``norms/``, ``goemotions/`` and ``emobank/`` (default: the package's data; see
            :func:`emokern.core.emotions.load_norms` and :mod:`emokern.validation.datasets`).
        scenarios, intensity, steering_prompts: JSON files replacing the packaged implicit scenarios, intensity
            templates and steering sanity prompts of sections 5-7 (see :mod:`emokern.validation.concept_data` for their shapes).
        steering_strengths: the sanity check's strengths (default :data:`emokern.validation.concept_checks.STEERING_STRENGTHS`).

    Returns:
        The report as a dict (exactly what ``report.json`` holds): ``bank``, ``model``, ``layer``,
        ``classification``, ``geometry``, ``logit_lens``, ``goemotions``, ``emobank``, ``scenarios``,
        ``intensity``, ``steering``, ``validation_layers_plot``, ``files``. Numbers that
        cannot be computed (e.g. an AUROC for a label with no positive text) are ``None`` with a ``note``.

    Raises:
        ValueError: too few emotions, a layer outside the model or the bank, a bad limit or corpus.
        emokern.core.bank.BankMismatchError: the bank belongs to another model.
        emokern.util.data_files.DataFileMissingError: a data file is missing (checked before any model forward).
        emokern.experiments.inputs.InputFileError: a scenario, intensity or steering-prompt file is missing or
            malformed (also checked before any forward).
    """
    from emokern.version import __version__
    from emokern.core.emotions import load_norms
    from emokern.validation.datasets import load_emobank, load_goemotions

    K = len(bank.names)
    if K < MIN_EMOTIONS:
        raise ValueError(f"bank: expected at least {MIN_EMOTIONS} emotions (k-means with k = {N_CLUSTERS}; PCA needs "
                         f"3); got {K}: {bank.names}")
    goemotions_limit = _check_limit("goemotions_limit", goemotions_limit)
    emobank_limit = _check_limit("emobank_limit", emobank_limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
    stories = None if corpus is None else _corpus_pairs(corpus, bank.names)
    bank.check_model(model)
    layer, layer_source = _resolve_layer(bank, model, layer)
    # Every input is checked and every data file read before any output or forward pass, so that a mistake or a
    # missing file fails at once rather than after minutes of model time.
    norms = {n.word: n for n in load_norms(data_dir=data_dir)}
    goemotions = load_goemotions("test", data_dir=data_dir)
    emobank = load_emobank("test", data_dir=data_dir)
    scenario_list = concept_data.load_scenarios(scenarios)
    templates = concept_data.load_intensity(intensity)
    sanity = concept_data.load_sanity_prompts(steering_prompts)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vectors = bank.vectors[bank.layer_slot(layer)]
    featured = [e for e in FEATURED_EMOTIONS if e in bank.names] or bank.names[:len(FEATURED_EMOTIONS)]
    config = text_config(model.config)

    read = _layer_means(model, tokenizer, layer, batch_size, progress)
    external_fmt = _external_fmt(bank, tokenizer)
    classification = _classification(bank, layer, stories, read, out_dir)
    geometry, valence_direction = _geometry(vectors, bank.names, norms, out_dir)
    lens_rows, lens_method = logit_lens(vectors, model, tokenizer)
    report = {
        "emokern_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bank": {"model_id": bank.model_id, "fingerprint": bank.fingerprint, "n_emotions": K,
                 "names": list(bank.names), "layers": list(bank.layers), "hidden_size": bank.hidden_size},
        "model": {"model_type": getattr(config, "model_type", None),
                  "num_hidden_layers": int(config.num_hidden_layers)},
        "layer": {"index": layer, "source": layer_source},
        "featured": featured,
        "classification": classification,
        "geometry": geometry,
        "logit_lens": {"method": lens_method, "k": TOP_TOKENS,
                       "emotions": dict(zip(bank.names, lens_rows))},
        "goemotions": _goemotions(bank, layer, featured, goemotions, goemotions_limit, read, out_dir, external_fmt),
        "emobank": _emobank(valence_direction, emobank, emobank_limit, read, out_dir, external_fmt),
    }
    sections = concept_checks.concept_check_sections(
        bank, model, tokenizer, out_dir, layer=layer, scenarios=scenario_list, templates=templates, sanity=sanity,
        strengths=concept_checks.STEERING_STRENGTHS if steering_strengths is None else steering_strengths,
        progress=progress)
    report.update(scenarios=sections["scenarios"], intensity=sections["intensity"], steering=sections["steering"],
                  validation_layers_plot=sections["layers_plot"])
    plots = [p for p in (classification.get("plot"), *geometry["plots"].values(), report["goemotions"].get("plot"),
                         report["emobank"].get("plot"), report["scenarios"].get("plot"),
                         report["intensity"].get("plot"), report["steering"].get("plot"),
                         report["validation_layers_plot"]) if p]
    report["files"] = {"json": "report.json", "html": "report.html", "plots": plots}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.html").write_text(report_html(report, out_dir, top_snippets=TOP_SNIPPETS), encoding="utf-8")
    return report
