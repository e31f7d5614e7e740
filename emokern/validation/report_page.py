"""The validation report's page: the PNG figures of sections 1-4, written while the report is computed
(:mod:`emokern.validation.report`), and ``report.html``, which shows every number and embeds every figure. Sections
5-7 bring their own (:mod:`emokern.validation.concept_checks_page`). matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from emokern.validation.concept_checks import SCENARIO_TOP, STEERING_TOP
from emokern.validation.concept_checks_page import concept_checks_html
from emokern.validation.html import embedded_png, escape, format_number, html_table, new_figure, save_png

__all__ = ["cosine_matrix_png", "emobank_valence_png", "goemotions_auroc_png", "pca_scatter_png", "quality_curve_png",
           "report_html"]


def quality_curve_png(curve: Dict, layer: int, K: int, path: Path) -> str:
    """Section 1: the bank's held-out accuracy by layer (test and validation curves, valence AUROC, the probe's
    points), chance levels and the report layer marked; returns the file name."""
    fig = new_figure(7.2, 3.8)
    ax = fig.add_subplot()
    held = "test premises" if curve["split"] == "premises" else "held-out stories"
    ax.plot(curve["layers"], curve["top1"], marker="o", ms=3, color="C0", label=f"top-1 ({held})")
    ax.plot(curve["layers"], curve["top5"], marker="o", ms=3, color="C1", label=f"top-{min(5, K)} ({held})")
    if curve.get("validation_top1"):
        ax.plot(curve["layers"], curve["validation_top1"], ls="--", lw=1, color="C0", alpha=0.6,
                label="top-1 (validation premises)")
        ax.plot(curve["layers"], curve["validation_top5"], ls="--", lw=1, color="C1", alpha=0.6,
                label=f"top-{min(5, K)} (validation premises)")
    if curve.get("valence_auroc"):
        ax.plot(curve["layers"], curve["valence_auroc"], marker=".", ms=3, color="C3", lw=1,
                label="valence AUROC (test premises)")
    for name, value in (curve.get("probe_top1") or {}).items():
        ax.plot([int(name)], [value], marker="*", ms=10, color="C2", ls="none",
                label="probe top-1 (ceiling)" if name == next(iter(curve["probe_top1"])) else None)
    ax.axhline(1 / K, color="grey", ls=":", lw=1, label=f"chance top-1 (1/{K})")
    ax.axhline(min(5, K) / K, color="grey", ls="-.", lw=0.8, label=f"chance top-{min(5, K)}")
    ax.axvline(layer, color="crimson", ls="--", lw=1, label=f"report layer {layer}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy / AUROC")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Held-out story classification over {K} emotions")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_png(fig, path)


def pca_scatter_png(scores, names, cluster_of, ratio, oriented: bool, path: Path, *, n_clusters: int) -> str:
    """Section 2: the K vectors on PC1 x PC2, coloured by k-means cluster (1..``n_clusters``), each named;
    returns the file name."""
    from matplotlib import colormaps

    K = len(names)
    fig = new_figure(8.5, 7.0)
    ax = fig.add_subplot()
    cmap = colormaps["tab10"]
    for c in range(1, n_clusters + 1):
        sel = cluster_of == c
        ax.scatter(scores[sel, 0], scores[sel, 1], s=14, color=cmap(c - 1), label=f"cluster {c} ({int(sel.sum())})")
    fontsize = 7 if K <= 40 else 4.5
    for k, name in enumerate(names):
        ax.annotate(name.replace("$", r"\$"), (scores[k, 0], scores[k, 1]), fontsize=fontsize,
                    xytext=(2, 2), textcoords="offset points")
    note = " (oriented: + = positive valence)" if oriented else " (sign arbitrary)"
    ax.set_xlabel(f"PC1, {100 * ratio[0]:.1f}% of variance{note}")
    ax.set_ylabel(f"PC2, {100 * ratio[1]:.1f}% of variance{' (oriented: + = arousal)' if oriented else ''}")
    ax.set_title(f"PCA of {K} emotion vectors, coloured by k-means cluster (k = {n_clusters})")
    ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)


def cosine_matrix_png(matrix: np.ndarray, names: List[str], sizes: List[int], path: Path) -> str:
    """Section 2: the K x K cosine matrix in cluster order (``sizes``: the clusters' sizes, drawn as blocks);
    returns the file name."""
    K = len(names)
    side = max(6.0, min(18.0, 0.1 * K + 3))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fontsize = max(3.0, min(8.0, 500 / K))
    ax.set_xticks(range(K), [n.replace("$", r"\$") for n in names], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(K), [n.replace("$", r"\$") for n in names], fontsize=fontsize)
    for edge in np.cumsum(sizes)[:-1]:
        ax.axhline(edge - 0.5, color="black", lw=0.6)
        ax.axvline(edge - 0.5, color="black", lw=0.6)
    ax.set_title("Cosine similarity of the emotion vectors (ordered by k-means cluster)")
    fig.colorbar(im, ax=ax, shrink=0.6)
    return save_png(fig, path)


def goemotions_auroc_png(labels: Dict, path: Path) -> str:
    """Section 4: the AUROC of each scored GoEmotions label, beside chance; returns the file name."""
    rows = [(f"{label} → {r['emotion']} ({r['n_pos']}+)", r["auroc"]) for label, r in labels.items()
            if r["auroc"] is not None]
    rows.sort(key=lambda t: t[1])
    fig = new_figure(6.4, 0.28 * len(rows) + 1.4)
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [a for _, a in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC (0.5 = chance); (n+) = positive comments")
    ax.set_title("GoEmotions test: label vs matching emotion's projection")
    return save_png(fig, path)


def emobank_valence_png(readout: np.ndarray, human: List[float], r: Optional[float], path: Path) -> str:
    """Section 4: the valence readout of each EmoBank sentence against its human valence, with r; returns the file
    name."""
    fig = new_figure(5.6, 4.2)
    ax = fig.add_subplot()
    ax.scatter(human, readout, s=8, alpha=0.5)
    ax.set_xlabel("human valence (EmoBank V, 1-5)")
    ax.set_ylabel("valence readout (projection on oriented PC1)")
    ax.set_title(f"EmoBank test: r = {format_number(r)} (n = {len(human)})")
    return save_png(fig, path)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; } .note { color: #666; font-size: .9em; }
code.tok { background: #f3f3f3; padding: 0 .2em; margin: 0 .1em; white-space: pre; }
table.cos td { padding: 0 .2em; font-size: .75em; }
"""


def _correlation_text(c: Dict) -> str:
    extra = f" — {escape(c['note'])}" if c.get("note") else ""
    p = f", p = {c['p']:.2g}" if c.get("p") is not None else ""
    return f"r = {format_number(c['r'])} (n = {c['n']}{p}){extra}"


def _token_list(items: List[Dict]) -> str:
    return "".join(f'<code class="tok" title="id {t["id"]}, logit {t["logit"]:.3f}">'
                   f"{escape(json.dumps(t['token'], ensure_ascii=False))}</code>" for t in items)


def report_html(report: Dict, out_dir: Path, *, top_snippets: int) -> str:
    """``report.html``: every section of ``report`` (as :func:`emokern.validation.report.validation_report` builds
    it) on one self-contained page, its PNGs read from ``out_dir`` and embedded; ``top_snippets``: how many
    GoEmotions comments per featured emotion the report kept."""
    b, g, c = report["bank"], report["geometry"], report["classification"]
    m = report["model"]
    ge, eb, lens = report["goemotions"], report["emobank"], report["logit_lens"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>emokern report: "
             f"{escape(b['model_id'] or 'bank')}</title><style>{_CSS}</style></head><body>",
             "<h1>emokern validation report</h1>",
             html_table(["field", "value"], [
                 ["model", escape(b["model_id"] or "—")], ["fingerprint", escape(b["fingerprint"] or "—")],
                 ["model type / layers", escape(f"{m['model_type']} / {m['num_hidden_layers']}")],
                 ["emotions (K)", b["n_emotions"]], ["bank layers", escape(b["layers"])],
                 ["report layer", escape(f"{report['layer']['index']} ({report['layer']['source']})")],
                 ["hidden size", b["hidden_size"]], ["emokern", escape(report["emokern_version"])],
                 ["created", escape(report["created"])]])]

    # 1. Classification
    parts.append("<h2>1. Held-out story classification</h2>")
    parts.append(f"<p>Chance: top-1 = {format_number(c['chance_top1'])}, top-5 = {format_number(c['chance_top5'])} "
                 f"(K = {b['n_emotions']}).</p>")
    q = c["quality_curve"]
    if q:
        L = report["layer"]["index"]
        if q["split"] == "premises":
            parts.append(f"<p>Measured at extraction with <b>whole premises held out</b>: vectors from "
                         f"{q['n_train']} training stories chose the layer on {q['n_validation']} validation "
                         f"stories; vectors from both were then tested on {q['n_test']} stories of premises that took "
                         f"no part ({escape(q.get('layer_rule') or '')}).</p>")
            parts.append(html_table(["at layer " + str(L), "test", "chance"], [
                [f"{b['n_emotions']}-way top-1 (mean-difference vectors)", format_number(q["top1_at_layer"]),
                 format_number(c["chance_top1"])],
                [f"{b['n_emotions']}-way top-5", format_number(q["top5_at_layer"]), format_number(c["chance_top5"])],
                ["top-1 of a logistic-regression probe (the linear-readout ceiling)",
                 format_number(q["probe_top1_at_layer"]), format_number(c["chance_top1"])],
                ["valence AUROC: positive vs negative emotions' stories", format_number(q["valence_auroc_at_layer"]),
                 "0.5"]]))
        else:
            parts.append(f"<p>From the bank's metadata (held out at extraction; {q['n_train']} training, "
                         f"{q['n_test']} test stories): at layer {L}, top-1 = "
                         f"{format_number(q['top1_at_layer'])}, top-5 = {format_number(q['top5_at_layer'])}.</p>")
        parts.append(embedded_png(out_dir, c.get("plot"), "Held-out accuracy by layer"))
        columns = [("top-1", q["top1"]), ("top-5", q["top5"]), ("validation top-1", q.get("validation_top1")),
                   ("validation top-5", q.get("validation_top5")), ("valence AUROC", q.get("valence_auroc"))]
        columns = [(name, values) for name, values in columns if values]
        parts.append("<details><summary>per layer</summary>" +
                     html_table(["layer"] + [n for n, _ in columns],
                                [[layer] + [v[i] for _, v in columns] for i, layer in enumerate(q["layers"])]) +
                     "</details>")
    else:
        parts.append("<p class='note'>The bank's metadata holds no quality curve.</p>")
    if c["corpus"]:
        cc = c["corpus"]
        parts.append(f"<p>Given corpus ({cc['n']} stories, {cc['n_excluded']} left out as not in the bank; "
                     f"fmt={escape(cc['fmt'])}, first_token={cc['first_token']}; {escape(cc['centering'])}): "
                     f"top-1 = {format_number(cc['top1'])}, top-5 = {format_number(cc['top5'])}.</p>")

    # 2. Geometry
    ve = g["variance_explained"]
    parts.append("<h2>2. Geometry</h2>")
    parts.append(f"<p>PCA of the {g['n_emotions']} vectors: PC1 explains {format_number(ve['pc1'])}, PC2 "
                 f"{format_number(ve['pc2'])} of the variance (paper: 0.26 and 0.15).</p>")
    parts.append(html_table(
        ["comparison with human norms", "all rated emotions", "strict (no derived matches)", "paper"],
        [["PC1 vs valence", _correlation_text(g["pc1_valence"]), _correlation_text(g["pc1_valence_strict"]),
          "r = 0.81 (n = 45)"],
         ["PC2 vs arousal", _correlation_text(g["pc2_arousal"]), _correlation_text(g["pc2_arousal_strict"]),
          "r = 0.66 (n = 45)"]]))
    parts.append(f"<p class='note'>{escape(g['orientation'])}. Norms: {escape(g['norms'])}.</p>")
    parts.append(embedded_png(out_dir, g["plots"]["pca_scatter"], "PC1 × PC2, coloured by k-means cluster"))
    parts.append(f"<p>k-means (k = {g['kmeans']['k']}, random_state = {g['kmeans']['random_state']}, inertia "
                 f"{format_number(g['kmeans']['inertia'])}); clusters numbered by decreasing mean PC1:</p>")
    parts.append(html_table(["cluster", "size", "mean PC1", "members"],
                            [[cl["cluster"], cl["size"], cl["mean_pc1"], escape(", ".join(cl["members"]))]
                             for cl in g["clusters"]]))
    parts.append("<details><summary>per-emotion coordinates and norms</summary>" +
                 html_table(["emotion", "PC1", "PC2", "cluster", "valence (1-9)", "arousal (1-9)"],
                            [[escape(r["name"]), r["pc1"], r["pc2"], r["cluster"], r["valence"], r["arousal"]]
                             for r in g["emotions"]]) + "</details>")
    parts.append(embedded_png(out_dir, g["plots"]["cosine_matrix"], "Cosine similarity, ordered by cluster"))
    order = g["cosine"]["order"]
    parts.append("<details><summary>cosine-similarity matrix (ordered by cluster)</summary>" +
                 html_table([""] + order, [[escape(n)] + row for n, row in zip(order, g["cosine"]["matrix"])], "cos") +
                 "</details>")

    # 3. Logit lens
    parts.append("<h2>3. Logit lens</h2>")
    parts.append(f"<p class='note'>{escape(lens['method'])}. Top {lens['k']} tokens; every emotion is in report.json."
                 f"</p>")
    parts.append(html_table(["emotion", "promoted", "suppressed"],
                            [[escape(e), _token_list(lens["emotions"][e]["promoted"]),
                              _token_list(lens["emotions"][e]["suppressed"])] for e in report["featured"]]))

    # 4. External text
    parts.append("<h2>4. External text</h2><h3>GoEmotions (test)</h3>")
    parts.append(f"<p>{ge['n_texts']} of {ge['n_available']} comments ({escape(ge['selection'])}); "
                 f"{escape(ge['readout'])}. AUROC scored for {ge['n_scored']} labels; mean AUROC = "
                 f"{format_number(ge['mean_auroc'])}.</p>")
    parts.append(embedded_png(out_dir, ge.get("plot"), "AUROC per GoEmotions label"))
    parts.append(html_table(["label", "emotion", "positives", "negatives", "AUROC", "note"],
                            [[escape(label), escape(r["emotion"]), r["n_pos"], r["n_neg"], r["auroc"],
                              escape(r.get("note", ""))] for label, r in ge["labels"].items()]))
    parts.append(f"<p class='note'>Labels without a clear counterpart among the 171 emotions (not scored): "
                 f"{escape(', '.join(ge['unmapped']))}.</p>")
    parts.append(f"<h3>Top-{top_snippets} GoEmotions comments per featured emotion</h3>")
    for emotion, rows in ge["top_snippets"].items():
        parts.append(f"<h4>{escape(emotion)}</h4>" + html_table(["projection", "comment", "GoEmotions labels"], [
            [r["score"], escape(r["text"]), escape(", ".join(r["labels"]))] for r in rows]))
    parts.append("<h3>EmoBank (test)</h3>")
    parts.append(f"<p>{escape(eb['readout'])}; {escape(eb['selection'])}. Valence readout vs human valence: "
                 f"{_correlation_text(eb)}.</p>")
    parts.append(embedded_png(out_dir, eb.get("plot"), "EmoBank valence readout vs human valence"))

    # 5-7. Implicit scenarios, intensity, steering sanity check
    parts.append(concept_checks_html(report, out_dir, scenario_top=SCENARIO_TOP, steering_top=STEERING_TOP))

    parts.append("<h2>Data sources</h2><ul class='note'>"
                 "<li>Glasgow Norms © Scott, Keitel, Becirspahic, Yao &amp; Sereno (2019), CC BY 4.0; subset "
                 "extracted, values unchanged.</li>"
                 "<li>GoEmotions: Demszky et al. (2020), ACL. Data © Google LLC, Apache-2.0.</li>"
                 "<li>EmoBank by Sven Buechel and Udo Hahn (JULIE Lab, Friedrich-Schiller-Universität Jena), "
                 "github.com/JULIELab/EmoBank, CC BY-SA 4.0; file corpus/emobank.csv, unmodified.</li></ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
