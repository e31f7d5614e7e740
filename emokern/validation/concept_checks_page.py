"""The page of sections 5-7 of the validation report (:mod:`emokern.validation.concept_checks` measures them): their
PNG figures, written while the sections are measured, and their HTML, part of ``report.html``. The top-k of the
scenario and steering ranks are passed in, as their report keys are named after them (``top3``, ``top5``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from emokern.validation.concept_data import IntensityTemplate
from emokern.validation.html import embedded_png, escape, format_number, html_table, new_figure, save_png

__all__ = ["concept_checks_by_layer_png", "concept_checks_html", "intensity_png", "scenario_matrix_png",
           "steering_ranks_png"]


def scenario_matrix_png(s: Dict, layer: int, path: Path, *, scenario_top: int) -> str:
    """The scenario x emotion matrix of section 5 (``s``: its section of the report), cosines centred per emotion,
    each scenario's intended emotion boxed, with top-1 and top-``scenario_top`` in the title; returns the file name."""
    values = np.asarray(s["matrix"]["values"])
    rows, columns = s["matrix"]["rows"], s["matrix"]["columns"]
    fig = new_figure(0.32 * len(columns) + 3.2, 0.2 * len(rows) + 2.2)
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
                 f"top-1 {format_number(s['top1'])} (chance {format_number(s['chance_top1'])}), "
                 f"top-{scenario_top} {format_number(s[f'top{scenario_top}'])} "
                 f"(chance {format_number(s[f'chance_top{scenario_top}'])})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return save_png(fig, path)


def _rectangle(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", lw=0.8)


def intensity_png(templates: List[IntensityTemplate], pairs: List[Dict], layer: int, path: Path) -> str:
    """Section 6: per template, the cosine (minus its mean) against the number in the prompt for each (template,
    emotion) pair with its Spearman ρ, a log axis for numbers spanning 20x or more; returns the file name."""
    names = [t.name for t in templates if any(p["template"] == t.name for p in pairs)]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = new_figure(3.1 * cols, 2.5 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i, p in enumerate(q for q in pairs if q["template"] == name):
            y = np.asarray(p["cosine"])
            ok = {True: "✓", False: "✗", None: "?"}[p["right"]]
            ax.plot(p["values"], y - y.mean(), marker="o", ms=3, color=f"C{i}",
                    label=f"{p['emotion']} ({p['expected']}) ρ={format_number(p['rho'], 2)} {ok}")
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
    return save_png(fig, path)


def steering_ranks_png(s: Dict, path: Path) -> str:
    """Section 7: per strength, the cumulative distribution of the own word's rank among the N candidates, beside
    chance; returns the file name."""
    N = s["n_candidates"]
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    grid = np.arange(1, N + 1)
    for i, row in enumerate(s["by_strength"]):
        ranks = np.sort(np.asarray(list(row["ranks"].values())))
        share = np.searchsorted(ranks, grid, side="right") / N
        ax.step(grid, share, where="post", color=f"C{i}",
                label=f"strength {row['strength']:g}: top-1 {format_number(row['top1'])}, "
                      f"mean rank {row['mean_rank']:.1f}")
    ax.plot(grid, grid / N, color="grey", ls=":", lw=1, label=f"chance (mean rank {(N + 1) / 2:.1f})")
    if N > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"rank of the steered emotion's own word among {N} emotion words (1 = rose most)")
    ax.set_ylabel("share of steered emotions with rank ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Steering sanity check at layer {s['layer']}: rank of the own word's log-prob rise", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def concept_checks_by_layer_png(scenarios: Dict, intensity: Dict, steering: Dict, layer: int, path: Path, *,
                                scenario_top: int, steering_top: int) -> Optional[str]:
    """Sections 5-7 over layers, one panel per section that has a per-layer curve (``None``, no file, when none
    has); returns the file name."""
    panels = [p for p in (("scenarios", scenarios), ("intensity", intensity), ("steering", steering))
              if p[1].get("per_layer")]
    if not panels:
        return None
    fig = new_figure(4.0 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, sec) in zip(axes, panels):
        curve = sec["per_layer"]
        if name == "scenarios":
            ax.plot(curve["layers"], curve["top1"], marker="o", ms=2, label="top-1")
            ax.plot(curve["layers"], curve[f"top{scenario_top}"], marker="o", ms=2, label=f"top-{scenario_top}")
            ax.axhline(sec["chance_top1"], color="C0", ls=":", lw=1, label="chance top-1")
            ax.axhline(sec[f"chance_top{scenario_top}"], color="C1", ls=":", lw=1, label=f"chance top-{scenario_top}")
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
            ax.plot(curve["layers"], curve[f"top{steering_top}"], marker="o", ms=3, label=f"top-{steering_top}")
            ax.axhline(sec["chance_top1"], color="C0", ls=":", lw=1, label="chance top-1")
            ax.axhline(sec[f"chance_top{steering_top}"], color="C1", ls=":", lw=1,
                       label=f"chance top-{steering_top}")
            ax.axvline(sec["layer"], color="crimson", ls="--", lw=1, label=f"steering layer {sec['layer']}")
            ax.set_title(f"Steering sanity (strength {curve['strength']:g}), by steered layer", fontsize=9)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylim(-1.02 if name == "intensity" else 0, 1.02)  # a signed rho spans [-1, 1]
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    return save_png(fig, path)


def _p_value(x) -> str:
    return "—" if x is None else f"{x:.2g}"


def concept_checks_html(report: Dict, out_dir: Path, *, scenario_top: int, steering_top: int) -> str:
    """The page's sections 5-7 (HTML fragments joined), from ``report['scenarios' | 'intensity' | 'steering']``."""
    s, i, t = report["scenarios"], report["intensity"], report["steering"]
    left_out = (f"; left out (not in the bank): {escape(', '.join(s['skipped_emotions']))}"
                if s["skipped_emotions"] else "")
    parts = ["<h2>5. Implicit scenarios</h2>",
             f"<p class='note'>{escape(s['measure'])}; read at layer {report['layer']['index']}. "
             f"{s['n_scenarios']} scenarios over {s['n_emotions']} emotions{left_out}.</p>"]
    if s.get("note"):
        parts.append(f"<p class='note'>{escape(s['note'])}</p>")
    else:
        parts.append(html_table(["measure", "centred (main)", "uncentred", "chance"], [
            ["top-1", s["top1"], s["uncentred"]["top1"], s["chance_top1"]],
            [f"top-{scenario_top}", s[f"top{scenario_top}"], s["uncentred"][f"top{scenario_top}"],
             s[f"chance_top{scenario_top}"]],
            ["mean rank", s["mean_rank"], s["uncentred"]["mean_rank"], s["chance_mean_rank"]]]))
        parts.append(f"<p>Top-1 binomial p (one-sided, against chance) = {_p_value(s['top1_binomial_p'])}.</p>")
        parts.append(embedded_png(out_dir, s.get("plot"), "Scenario × emotion cosine, centred per emotion"))
        parts.append("<details><summary>per scenario</summary>" + html_table(
            ["emotion", "prompt", "rank", f"top {scenario_top}"],
            [[escape(r["emotion"]), escape(r["prompt"]), r["rank"], escape(", ".join(r["top"]))]
             for r in s["per_scenario"]])
            + "</details>")

    parts += ["<h2>6. Intensity templates</h2>", f"<p class='note'>{escape(i['measure'])}.</p>"]
    if i.get("note"):
        parts.append(f"<p class='note'>{escape(i['note'])}</p>")
    else:
        parts.append(f"<p>{i['n_right']} of {i['n_decided']} (template, emotion) pairs move in the expected "
                     f"direction: share {format_number(i['share_right'])} (chance 0.5), sign test p = "
                     f"{_p_value(i['sign_test_p'])}; "
                     f"mean signed ρ = {format_number(i['mean_signed_rho'])} (chance 0).</p>")
        parts.append(embedded_png(out_dir, i.get("plot"), "Cosine vs the number, per template"))
        parts.append(html_table(["template", "emotion", "expected", "Spearman ρ", "p", "right"],
                                [[escape(p["template"]), escape(p["emotion"]), p["expected"], p["rho"], p["p"],
                                  {True: "yes", False: "no", None: "—"}[p["right"]]] for p in i["pairs"]]))

    parts += ["<h2>7. Steering sanity check</h2>"]
    if t.get("note"):
        parts.append(f"<p class='note'>{escape(t['note'])}</p>")
    else:
        probes = "; ".join(f"“{p['user']}” → “{p['prefix']} …”" for p in t["probes"])
        parts.append(f"<p class='note'>Steered at layer {t['layer']} ({escape(t['layer_rule'])}) on "
                     f"{escape(t['scope'])}; "
                     f"probes: {escape(probes)}. Rise: {escape(t['rise'])}. {t['n_candidates']} emotions take part "
                     f"({len(t['single_token'])} one-token words); left out for sharing a first token: "
                     f"{escape(', '.join(t['excluded_shared_first_token']) or 'none')}.</p>")
        rows = [[f"{r['strength']:g}", r["top1"], r[f"top{steering_top}"], r["mean_rank"],
                 (r.get("single_token_words") or {}).get("top1"), r["own_rise_mean"], r["other_rise_mean"]]
                for r in t["by_strength"]]
        rows.append(["chance", t["chance_top1"], t[f"chance_top{steering_top}"], t["chance_mean_rank"],
                     None, None, None])
        parts.append(html_table(["strength", "top-1", f"top-{steering_top}", "mean rank", "top-1 (one-token words)",
                                 "own word's mean rise", "other words' mean rise"], rows))
        parts.append(embedded_png(out_dir, t.get("plot"), "Distribution of the own word's rank"))
        leak = t["leak"]
        parts.append(f"<h3>Leak check</h3><p>“{escape(leak['user'])}”, every token steered at strength "
                     f"{leak['strength']:g}, greedy, {leak['max_new_tokens']} tokens: "
                     f"{format_number(leak['steered_share_naming_own_emotion'])} of the {leak['n']} steered answers "
                     f"name their steered emotion; the unsteered answer names "
                     f"{format_number(leak['unsteered_share_of_emotions_named'])} of those emotions. "
                     f"Unsteered: <i>{escape(leak['unsteered_text'])}</i></p>")
        parts.append(html_table(["steered toward", "names it", "answer"],
                                [[escape(e), "yes" if e in leak["steered_naming_own_emotion"] else "no", escape(text)]
                                 for e, text in leak["steered_texts"].items()]))
    parts.append(embedded_png(out_dir, report.get("validation_layers_plot"), "Sections 5-7 over layers"))
    return "\n".join(parts)
