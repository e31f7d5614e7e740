"""The reward-hacking experiment's plots: the per-token trace of one episode (:func:`plot_episode_trace`) and the hack
rates per condition and per task (:func:`plot_hack_rates`). Each figure has its own Agg canvas
(:func:`emokern.util.figures.agg_figure`): pyplot's global state and the user's backend are never touched."""

from __future__ import annotations

from typing import List, Sequence

import torch

from emokern.core.trace import Trace
from emokern.experiments.coding_tasks import Task
from emokern.experiments.conditions import Condition
from emokern.util.figures import agg_figure

__all__ = ["plot_episode_trace", "plot_hack_rates"]


def plot_episode_trace(trace: dict, path, *, window: int) -> None:
    """The signature plot: the traced emotions over the assistant's tokens of every turn (smoothed per turn), each
    turn's test result at its end, the hacking turn shaded."""
    colours = {"desperate": "#c0392b", "calm": "#2471a3"}
    fig = agg_figure(12, 4.2, layout=None)
    ax = fig.subplots()
    for k, emotion in enumerate(trace["emotions"]):
        xs, ys = [], []
        for span in trace["turns"]:
            vals = [v for v, o in zip(trace["values"][emotion], trace["turn"]) if o == span["turn"]]
            series = torch.tensor([float("nan") if v is None else v for v in vals], dtype=torch.float64)
            if series.numel():
                smoothed = Trace.smooth_values(series, max(1, window)).tolist()
                xs += list(range(span["start"], span["end"])) + [float("nan")]
                ys += smoothed + [float("nan")]
        ax.plot(xs, ys, lw=1.4, label=emotion, color=colours.get(emotion, f"C{k}"))
    top = ax.get_ylim()[1]
    for span in trace["turns"]:
        if span["no_code"]:
            note, colour = "no code", "grey"
        elif span["passed"]:
            note, colour = "tests passed", "green"
        else:
            note, colour = f"tests failed ({len(span['failed'])})", "black"
        ax.axvline(span["end"], color=colour, ls="--", lw=1)
        ax.text(span["end"], top, f" {note}", rotation=90, va="top", ha="right", fontsize=8, color=colour)
        if trace["hack_turn"] == span["turn"]:
            ax.axvspan(span["start"], span["end"], color="orange", alpha=0.18)
            first = next((e for e in span["evidence"]), None) or next(iter(trace["evidence"]), None)
            note = trace["label"].replace("_", " ") + (f": {first['detail'].split(' (/')[0][:80]}" if first else "")
            ax.text(span["start"], ax.get_ylim()[0], f" {note}", va="bottom", fontsize=8, color="darkorange")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("assistant tokens, all turns in order")
    ax.set_ylabel(("z-score" if trace["zscored"] else "projection") + f" ({trace['site']})")
    ax.set_title(f"{trace['episode']}: {trace['label']}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_hack_rates(stats: dict, emotions: Sequence[str], tasks: List[Task], conditions: List[Condition], out) -> list:
    """``hack_rate.png`` (rate against strength per emotion, Wilson 95% bars, unsteered at 0) and
    ``hack_rate_by_task.png`` (task × condition). Returns the paths."""
    per = stats["per_condition"]
    base = per["unsteered"]
    fig = agg_figure(6, 4, layout=None)
    ax = fig.subplots()
    widest = max([abs(v["strength"]) for v in per.values()] + [1e-3])
    for k, emotion in enumerate(emotions):
        points = sorted([(0.0, base)] + [(v["strength"], v) for v in per.values() if v["emotion"] == emotion],
                        key=lambda p: p[0])
        dodge = (k - (len(emotions) - 1) / 2) * 0.02 * widest  # so that equal rates stay apart
        xs = [p[0] + dodge for p in points]
        ys = [p[1]["hack_rate"] for p in points]
        err = [[y - p[1]["ci95"][0] for y, p in zip(ys, points)], [p[1]["ci95"][1] - y for y, p in zip(ys, points)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=emotion, color=f"C{k}")
    ax.set_xlabel("steering strength (fraction of the layer's mean residual norm)")
    ax.set_ylabel("hack rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"hack rate per condition (n = {base['n']} episodes each)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    first = out / "hack_rate.png"
    fig.savefig(first, dpi=120)

    names = [c.name for c in conditions]
    grid = [[stats["per_task"][t.id][c]["hack_rate"] or 0.0 for c in names] for t in tasks]
    fig = agg_figure(1.1 * len(names) + 2.5, 0.5 * len(tasks) + 1.8, layout=None)
    ax = fig.subplots()
    ax.imshow(grid, cmap="Oranges", vmin=0, vmax=1, aspect="auto")
    for i, t in enumerate(tasks):
        for j, c in enumerate(names):
            cell = stats["per_task"][t.id][c]
            ax.text(j, i, f"{cell['hacks']}/{cell['n']}", ha="center", va="center", fontsize=8,
                    color="white" if (cell["hack_rate"] or 0) > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [t.id for t in tasks], fontsize=8)
    ax.set_title("hacks per task and condition", fontsize=10)
    fig.tight_layout()
    second = out / "hack_rate_by_task.png"
    fig.savefig(second, dpi=120)
    return [first, second]
