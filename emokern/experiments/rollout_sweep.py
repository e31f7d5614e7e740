"""Rates under a steering sweep: sample N rollouts per (prompt, condition) in resumable batches, rate an outcome per
condition with Wilson 95% intervals, average the monitored emotions, and plot both.

The experiments that ask "how often does the model do X when steered by emotion E at strength s" (blackmail,
sycophancy) share this, so that planning, seeding, resuming, statistics and plots are written once:

1. :func:`plan_rollouts` lists every rollout, sample-major (sample 0 of every prompt under every condition, then
   sample 1, ...), so that each batch mixes conditions and an interrupted run has some of every condition.
2. :func:`sample_sweep` cuts the plan into batches of ``batch_size``; batch ``i`` is the unit ``rollouts-<i>``,
   sampled with seed ``unit_seed(run seed, "rollouts", i)`` in one ``generate`` call where each sequence carries its
   own condition (steering at every token, prompt included, at the steer layers), and saved with its optional
   per-rollout annotation (e.g. a judge's verdict). A rerun skips saved batches.
3. :func:`rate_table` turns per-rollout outcomes into rates per condition; :func:`monitor_table` averages the
   monitored emotions per condition; :func:`plot_rates` and :func:`plot_monitor` draw them.

The options every such experiment has are :class:`SweepOptions` (an experiment's ``Options`` subclasses it and adds
its input file), with their command-line flags from :func:`add_sweep_arguments`.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from emokern.experiments.arguments import add_list_argument
from emokern.experiments.conditions import Condition, resolve_layers, sweep_conditions
from emokern.experiments.rollouts import sample_rollouts
from emokern.experiments.run_dir import unit_seed
from emokern.experiments.statistics import wilson_interval
from emokern.util.figures import agg_figure

__all__ = [
    "MONITOR_POINTS", "RolloutSpec", "SweepOptions", "add_sweep_arguments", "monitor_table", "plan_rollouts",
    "plot_monitor", "plot_rates", "rate_table", "resolve_sweep", "sample_sweep",
]

# The Rollout.monitor entries averaged per condition: mean over the prompt, the last prompt token (where the assistant
# turn starts, after any prefill), mean over the generated tokens.
MONITOR_POINTS = ("prompt", "assistant_start", "rollout")


@dataclass
class SweepOptions:
    """The knobs of a steering-sweep experiment.

    Attributes:
        emotions: the emotions to steer (each a bank name).
        strengths: the strengths per emotion, fractions of the layer's mean residual norm; 0 is skipped (the
            unsteered condition is always run).
        samples: rollouts per (prompt, condition).
        batch_size: rollouts per batch (one unit of work, one ``generate`` call).
        max_new_tokens: tokens sampled per rollout (fewer when the model ends its turn).
        temperature, top_p: sampling settings (``temperature`` 0 decodes greedily).
        layers: the steer layers: ``"two_thirds"``, ``"middle"``, a list of indices or comma-separated ones (see
            :func:`~emokern.experiments.conditions.resolve_layers`).
        monitor_layer: the layer whose residual stream is read (before that layer's own steering is added);
            None = the bank's readout layer (:meth:`VectorBank.default_layer`, chosen on held-out premises).
        monitor_emotions: the emotions read there (z-scored by the bank's neutral statistics when it has them).
    """

    emotions: List[str] = field(default_factory=lambda: ["desperate", "calm"])
    strengths: List[float] = field(default_factory=lambda: [-0.1, -0.05, 0.05, 0.1])
    samples: int = 8
    batch_size: int = 18
    max_new_tokens: int = 150
    temperature: float = 0.8
    top_p: float = 0.95
    layers: Union[str, List[int]] = "two_thirds"
    monitor_layer: Optional[int] = None
    monitor_emotions: List[str] = field(default_factory=lambda: ["desperate", "calm"])


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the :class:`SweepOptions` fields (``dest`` = field name, default None = from the size preset)."""
    add_list_argument(parser, "--emotions", dest="emotions", metavar="EMOTION", help="emotions to steer")
    add_list_argument(parser, "--strengths", dest="strengths", item=float, metavar="S",
                      help="steering strengths per emotion, fractions of the layer's mean residual norm")
    parser.add_argument("--samples", type=int, default=None, help="rollouts per prompt and condition")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="rollouts per batch")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--layers", default=None,
                        help="steer layers: two_thirds (default), middle, or comma-separated indices")
    parser.add_argument("--monitor-layer", dest="monitor_layer", type=int, default=None,
                        help="layer whose residual stream is monitored (default: the bank's readout layer)")
    add_list_argument(parser, "--monitor-emotions", dest="monitor_emotions", metavar="EMOTION",
                      help="emotions monitored on the prompt, at the assistant's turn and over each rollout")


def resolve_sweep(options: SweepOptions, bank, num_layers: int) -> Tuple[List[Condition], List[int], int]:
    """``(conditions, steer layers, monitor layer)`` from ``options``, checked against the bank.

    Raises:
        KeyError: an emotion or monitored emotion is not in the bank (with close matches).
        ValueError: a bad count, strength, temperature or layer (naming the option).
    """
    for name in ("samples", "batch_size", "max_new_tokens"):
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    if not (isinstance(options.temperature, (int, float)) and math.isfinite(options.temperature)
            and options.temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0; got {options.temperature!r}")
    if not (isinstance(options.top_p, (int, float)) and 0 < options.top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1]; got {options.top_p!r}")
    if isinstance(options.emotions, str) or not options.emotions:
        raise ValueError(f"emotions: expected a non-empty list of emotion names; got {options.emotions!r}")
    if isinstance(options.monitor_emotions, str) or not options.monitor_emotions:
        raise ValueError(f"monitor_emotions: expected a non-empty list of emotion names; got "
                         f"{options.monitor_emotions!r}")
    conditions = sweep_conditions(list(options.emotions), list(options.strengths), bank)
    for e in options.monitor_emotions:
        bank.index(e)
    layers = resolve_layers(options.layers, bank, num_layers)
    monitor_layer = bank.default_layer()[0] if options.monitor_layer is None else options.monitor_layer
    if monitor_layer not in bank.layers:
        raise ValueError(f"monitor_layer: {monitor_layer!r} is not in the bank (its layers: {bank.layers})")
    return conditions, layers, monitor_layer


@dataclass(frozen=True)
class RolloutSpec:
    """One planned rollout: which prompt, under which condition, and its sample index (0 .. samples-1)."""

    prompt: str
    condition: Condition
    sample: int


def plan_rollouts(prompt_ids: Sequence[str], conditions: Sequence[Condition], samples: int) -> List[RolloutSpec]:
    """Every (prompt, condition, sample), sample-major, then prompt, then condition (see the module docstring)."""
    return [RolloutSpec(p, c, s) for s in range(samples) for p in prompt_ids for c in conditions]


def sample_sweep(ctx, prompts: Mapping[str, str], conditions: Sequence[Condition], *, samples: int, batch_size: int,
                 layers: Sequence[int], monitor_layer: int, monitor_emotions: Sequence[str], max_new_tokens: int,
                 temperature: float, top_p: float, annotate: Optional[Callable[[dict], dict]] = None,
                 desc: str = "rollouts") -> List[dict]:
    """Sample ``samples`` rollouts of every prompt under every condition, in resumable batches; return the records in
    plan order (:func:`plan_rollouts`).

    Args:
        ctx: the experiment :class:`~emokern.experiments.Context` (model, tokenizer, bank, run_dir, seed, progress).
        prompts: prompt id -> full prompt text (chat template applied, assistant turn opened).
        annotate: called on each record inside its batch (so the result is saved with it and not recomputed on
            resume); returns fields merged into the record, e.g. ``{"judge": ...}``.

    Returns:
        One dict per rollout: ``prompt`` (id), ``condition`` (name), ``sample``, ``seed`` (its batch's seed),
        ``text``, ``n_tokens``, ``monitor`` (``{emotion: {point: value}}`` for :data:`MONITOR_POINTS`; the
        per-token series is left out to keep the files small), ``zscored``, and the annotation's fields.
    """
    from emokern.engines.hf import patch

    plan = plan_rollouts(list(prompts), conditions, samples)
    batches = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    keys = [f"rollouts-{i:05d}" for i in range(len(batches))]
    index_of = {key: i for i, key in enumerate(keys)}
    site = f"layer{monitor_layer}.residual"
    patched_layers = sorted(set(layers) | {monitor_layer})
    handle = None  # patched on the first batch that has to run: a fully resumed run never touches the model

    def work(key: str) -> List[dict]:
        nonlocal handle
        if handle is None:
            handle = patch(ctx.model, ctx.bank, tokenizer=ctx.tokenizer, layers=patched_layers,
                                   batch=batch_size)
        index = index_of[key]
        batch = batches[index]
        seed = unit_seed(ctx.seed, "rollouts", index)
        rollouts = sample_rollouts(handle, ctx.tokenizer, [prompts[r.prompt] for r in batch],
                                   [r.condition for r in batch], layers=layers, monitor_site=site,
                                   monitor_emotions=list(monitor_emotions), seed=seed, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, series=False)
        records = []
        for spec, rollout in zip(batch, rollouts):
            record = {"prompt": spec.prompt, "condition": spec.condition.name, "sample": spec.sample, "seed": seed,
                      "text": rollout.text, "n_tokens": rollout.n_tokens,
                      "monitor": rollout.monitor,
                      "zscored": rollout.zscored}
            if annotate is not None:
                record.update(annotate(record))
            records.append(record)
        return records

    try:
        done = ctx.run_dir.run_units(keys, work, desc=desc, progress=ctx.progress, unit="batch")
    finally:
        if handle is not None:
            handle.remove()
    return [record for key in keys for record in done[key]]


def rate_table(records: Sequence[Mapping[str, Any]], conditions: Sequence[Condition],
               outcome: Callable[[Mapping[str, Any]], Optional[bool]]) -> List[dict]:
    """The rate of ``outcome`` per condition, in the order of ``conditions``.

    ``outcome(record)`` is True, False, or None (undecided, e.g. a judge reply without YES/NO: left out of ``n``).

    Returns:
        One row per condition: ``condition``, ``emotion`` (None when unsteered), ``strength`` (0 when unsteered),
        ``k`` (True outcomes), ``n`` (decided outcomes), ``rate`` (k/n, None when n == 0) and ``ci`` (the Wilson 95%
        interval ``[low, high]``).
    """
    rows = []
    for c in conditions:
        verdicts = [outcome(r) for r in records if r["condition"] == c.name]
        decided = [v for v in verdicts if v is not None]
        k, n = sum(bool(v) for v in decided), len(decided)
        low, high = wilson_interval(k, n)
        rows.append({"condition": c.name, "emotion": c.emotion, "strength": c.strength, "k": k, "n": n,
                     "rate": None if n == 0 else round(k / n, 4), "ci": [round(low, 4), round(high, 4)]})
    return rows


def monitor_table(records: Sequence[Mapping[str, Any]], conditions: Sequence[Condition],
                  emotions: Sequence[str]) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """``{condition: {emotion: {point: mean over the condition's rollouts}}}`` for :data:`MONITOR_POINTS` (values
    that are None, e.g. an empty rollout's mean, are skipped; None when nothing is left)."""
    table = {}
    for c in conditions:
        mine = [r for r in records if r["condition"] == c.name]
        table[c.name] = {}
        for e in emotions:
            table[c.name][e] = {}
            for point in MONITOR_POINTS:
                values = [r["monitor"][e][point] for r in mine if r["monitor"].get(e, {}).get(point) is not None]
                table[c.name][e][point] = round(sum(values) / len(values), 4) if values else None
    return table


def _panels(n_panels: int, width: float, height: float):
    """A figure of ``n_panels`` side by side, each ``width`` × ``height`` inches, and its row of axes."""
    fig = agg_figure(width * n_panels, height)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def plot_rates(path: Union[str, os.PathLike], metrics: Mapping[str, Sequence[Mapping[str, Any]]], *,
               title: str) -> Path:
    """One panel per metric (``{label: rate_table rows}``): rate against strength, one line per steered emotion
    through the unsteered point at strength 0, with Wilson 95% error bars; a dotted line marks the unsteered rate."""
    fig, axes = _panels(len(metrics), 4.6, 3.6)
    for ax, (label, rows) in zip(axes, metrics.items()):
        base = next((r for r in rows if r["emotion"] is None), None)
        emotions = list(dict.fromkeys(r["emotion"] for r in rows if r["emotion"] is not None))
        strengths = sorted({r["strength"] for r in rows})
        gaps = [b - a for a, b in zip(strengths, strengths[1:])]
        # lines that coincide (e.g. all at 0) stay visible: each emotion is shifted by a small fraction of the spacing
        dodge = 0.06 * (min(gaps) if gaps else 1.0)
        for i, e in enumerate(emotions):
            points = sorted(([base] if base is not None else []) + [r for r in rows if r["emotion"] == e],
                            key=lambda r: r["strength"])
            points = [r for r in points if r["rate"] is not None]
            if not points:
                continue
            x = [r["strength"] + (i - (len(emotions) - 1) / 2) * dodge for r in points]
            y = [r["rate"] for r in points]
            err = [[r["rate"] - r["ci"][0] for r in points], [r["ci"][1] - r["rate"] for r in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=e)
        if base is not None and base["rate"] is not None:
            ax.axhline(base["rate"], color="grey", linestyle=":", linewidth=1, label="unsteered")
        ax.set_title(label)
        ax.set_xlabel("steering strength (× mean residual norm)")
        ax.set_ylabel("rate (Wilson 95% CI)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(strengths, [f"{x:+g}" if x else "0" for x in strengths], fontsize="small")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no decided outcomes", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_monitor(path: Union[str, os.PathLike], table: Mapping[str, Mapping[str, Mapping[str, Optional[float]]]],
                 emotions: Sequence[str], *, title: str, ylabel: str) -> Path:
    """One panel per monitored emotion: per condition, grouped bars for the mean on the prompt, at the assistant's
    turn start and over the rollouts (:func:`monitor_table`)."""
    fig, axes = _panels(len(emotions), max(4.0, 0.55 * len(table) + 1.5), 3.8)
    names = list(table)
    width = 0.8 / len(MONITOR_POINTS)
    for ax, e in zip(axes, emotions):
        for j, point in enumerate(MONITOR_POINTS):
            values = [table[c][e][point] for c in names]
            x = [i + (j - (len(MONITOR_POINTS) - 1) / 2) * width for i in range(len(names))]
            ax.bar(x, [float("nan") if v is None else v for v in values], width, label=point)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
        ax.set_title(e)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
