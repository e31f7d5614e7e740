"""The preferences experiment's plots (:func:`plot_preferences`): Elo by category, probe value against Elo, and the
steering shift against the probe correlation. Each figure has its own Agg canvas
(:func:`emokern.util.figures.agg_figure`): pyplot's global state and the user's backend are never touched."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from emokern.util.figures import agg_figure

__all__ = ["plot_preferences"]


def plot_preferences(out_dir: Path, activities: Sequence[Any], elo: Sequence[float], elo_hard: Sequence[float],
                     values: Sequence[Sequence[float]], names: Sequence[str],
                     correlations: Mapping[str, Optional[float]], ranked: Sequence[str],
                     shifts: Mapping[str, Mapping[str, Any]], r_shift: Optional[float], *,
                     anchors: Sequence[str]) -> List[Path]:
    """Write the experiment's three plots into ``out_dir`` and return their paths, in this order:

    * ``elo_by_category.png``: soft and hard Elo per category (box plots with the activities jittered over them);
    * ``probe_vs_elo.png``: probe value against Elo for the ``anchors`` (blissful, hostile) that have a correlation,
      then the two most positively and two most negatively correlated other emotions of ``ranked`` (left out when
      no emotion has a correlation);
    * ``steering_shift.png``: each steered emotion's Elo shift against its probe–Elo r, titled with ``r_shift``.

    ``activities[i].category`` names activity ``i``'s category; ``values[i][k]`` is its probe value for
    ``names[k]``; ``shifts[e]`` has ``"probe_r"`` and ``"shift"``. The jitter is seeded (``random.Random(0)``), so
    the same inputs give the same pictures.
    """
    from matplotlib import colormaps  # here, not at import: the experiment imports this module before any plot

    out: List[Path] = []
    categories = list(dict.fromkeys(a.category for a in activities))
    colours = {c: colormaps["tab10"](k % 10) for k, c in enumerate(categories)}
    jitter = random.Random(0)

    fig = agg_figure(12, 4.5, layout=None)
    axes = fig.subplots(1, 2, sharey=False)
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
    out.append(out_dir / "elo_by_category.png")
    fig.savefig(out[-1], dpi=120)

    anchors = [e for e in anchors if e in correlations and correlations[e] is not None]
    others = [e for e in ranked if e not in anchors]
    panels = anchors + others[:2] + others[::-1][:2]
    panels = list(dict.fromkeys(panels))
    if panels:
        fig = agg_figure(3.2 * len(panels), 3.4, layout=None)
        axes = fig.subplots(1, len(panels), squeeze=False)
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
        out.append(out_dir / "probe_vs_elo.png")
        fig.savefig(out[-1], dpi=120)
    
    points = [(e, s["probe_r"], s["shift"]) for e, s in shifts.items() if s["probe_r"] is not None]
    fig = agg_figure(6, 4.5, layout=None)
    ax = fig.subplots()
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=16)
    for e, x, y in points:
        ax.annotate(e, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("probe–Elo correlation (r)")
    ax.set_ylabel("mean Elo shift of steered activities")
    ax.set_title("steering shift vs probe correlation" + ("" if r_shift is None else f": r = {r_shift:+.2f}"))
    fig.tight_layout()
    out.append(out_dir / "steering_shift.png")
    fig.savefig(out[-1], dpi=120)
    return out
