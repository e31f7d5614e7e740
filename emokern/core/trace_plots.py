"""Pictures of a :class:`~emokern.core.trace.Trace`: a PNG line plot and a self-contained HTML token heatmap.

* :func:`plot_trace` — chosen emotions over the token positions of one sequence (matplotlib, Agg, PNG).
* :func:`trace_heatmap_html` — the tokens of one sequence coloured by one emotion, with a hover tooltip listing
  the top emotions at each position; one HTML file with inline CSS (and, only for the emotion switcher, a few
  lines of inline JS), so it opens offline and can be mailed around.

Positions are cache positions, as in the trace: index ``t`` of ``trace.tokens[sequence]``, left padding included.
Padding is never drawn.  Positions that were never fed through the model (NaN, e.g. the last generated token) are
shown without a value.

Two defaults make pictures of real models readable:

* **Z-scores when possible.**  ``zscore=None`` (the default) means z-scores against the neutral-text statistics
  when the trace has them (:attr:`Trace.has_neutral_stats`), raw projections otherwise; the axis label / page
  legend says which ("z-score vs neutral text" or "projection").  ``True`` / ``False`` force one.
* **Attention sinks off the scale.**  ``sinks=True`` (the default) finds the sink positions of the shown sequence at
  the shown site with :meth:`Trace.sink_positions` (the first token(s), ~100x larger than the rest).  They stay in
  the data but are left out of the scales and out of moving averages (``Trace.values(..., mask_sinks=True)``):
  the heatmap draws them grey with a small marker and their true (unsmoothed) value in the tooltip, the PNG plot
  masks them (gaps in the lines over a grey band) and says so in a note.  ``sinks=False`` treats them like any token.

matplotlib is imported inside :func:`plot_trace` only, so the HTML page (and ``import emokern.core.trace_plots``) does not need it.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch

from emokern.util.figures import agg_figure

if TYPE_CHECKING:  # pragma: no cover
    from emokern.core.trace import Trace

__all__ = ["plot_trace", "trace_heatmap_html", "scale_values", "value_color", "ZSCORE_LABEL", "PROJECTION_LABEL"]

# Token labels on the x axis only while they can still be read; beyond this the axis shows positions.
MAX_TOKEN_LABELS = 60

# End colours of the diverging scale (white at 0). Muted so black text stays readable up to ~0.55.
_POS_RGB = (214, 39, 40)
_NEG_RGB = (31, 96, 180)
_DARK_TEXT_ABOVE = 0.55
# Background of attention-sink tokens in the heatmap: a neutral grey outside the diverging scale.
_SINK_RGB = (200, 200, 200)

# What the values are, for axis labels and page legends.
ZSCORE_LABEL = "z-score vs neutral text"
PROJECTION_LABEL = "projection"


# ----------------------------------------------------------------------------------------------- shared helpers


def _check_sequence(trace: "Trace", sequence: int) -> int:
    B = trace.projections.shape[0]
    if not -B <= sequence < B:
        raise IndexError(f"sequence {sequence} is out of range for a trace of {B} sequence(s)")
    return sequence % B


def _site_name(trace: "Trace", site: Union[int, str, None]) -> str:
    idx = trace.site_index(site)
    if not -len(trace.sites) <= idx < len(trace.sites):
        raise IndexError(f"site {site} is out of range for a trace with {len(trace.sites)} site(s): {trace.sites}")
    return trace.sites[idx]


def _use_zscore(trace: "Trace", zscore: Optional[bool]) -> bool:
    """``zscore=None`` -> z-scores exactly when the trace has neutral statistics; otherwise ``bool(zscore)``."""
    return trace.has_neutral_stats if zscore is None else bool(zscore)


def _sink_mask(trace: "Trace", site: Union[int, str, None], sequence: int, sinks: bool) -> torch.Tensor:
    """(T,) bool: :meth:`Trace.sink_positions` of the shown sequence and site, or all False when ``sinks=False``."""
    if sinks:
        return trace.sink_positions(site, sequence)
    return torch.zeros(trace.projections.shape[1], dtype=torch.bool)


def scale_values(values: torch.Tensor, q: float = 0.99) -> Tuple[torch.Tensor, float]:
    """Scale a series to [-1, 1] by its ``q``-quantile absolute value (the paper's 99th-percentile convention).

    Returns ``(scaled, scale)``: ``scaled = clamp(values / scale, -1, 1)`` with NaN kept, and ``scale`` the
    (linear-interpolation) quantile of ``|values|`` over the non-NaN entries.  When that quantile is 0 (or there are
    no valid entries) the scale falls back to the largest absolute value, then to 1, so nothing divides by zero.
    """
    v = values.detach().to(torch.float64).flatten()
    valid = v[~torch.isnan(v)].abs()
    scale = float(torch.quantile(valid, q)) if valid.numel() else 0.0
    if not scale > 0:
        scale = float(valid.max()) if valid.numel() and float(valid.max()) > 0 else 1.0
    return (values.to(torch.float64) / scale).clamp(-1.0, 1.0), scale


def value_color(s: float) -> Optional[Tuple[int, int, int]]:
    """RGB for a scaled value ``s`` in [-1, 1]: white at 0, red-ish towards +1, blue-ish towards -1; None for NaN.

    Linear blend from white to the end colour by ``|s|``, rounded half up (the page's JS uses the same formula).
    """
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return None
    s = max(-1.0, min(1.0, float(s)))
    end = _POS_RGB if s >= 0 else _NEG_RGB
    a = abs(s)
    return tuple(int(255 + (c - 255) * a + 0.5) for c in end)  # type: ignore[return-value]


def _visible_plain(tok: str, max_len: Optional[int] = None) -> str:
    """Token text for a plot label: leading spaces as ``·``, newlines as ``↵``, tabs as ``→``."""
    n_lead = len(tok) - len(tok.lstrip(" "))
    text = "·" * n_lead + tok[n_lead:].replace("\n", "↵").replace("\r", "␍").replace("\t", "→")
    if not text:
        text = "∅"
    if max_len is not None and len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text


def _visible_html(tok: str, *, breaks: bool) -> str:
    """HTML for a token: escaped text, leading spaces as faint ``·``, newlines as ``↵`` (+ ``<br>`` if ``breaks``).

    Inner spaces stay real spaces (the container uses ``white-space: pre-wrap``), so words still read naturally.
    """
    n_lead = len(tok) - len(tok.lstrip(" "))
    out = [f'<span class="ws">{"·" * n_lead}</span>'] if n_lead else []
    rest = tok[n_lead:]
    newline = '<span class="ws">↵</span>' + ("<br>" if breaks else "")
    for i, line in enumerate(rest.split("\n")):
        if i:
            out.append(newline)
        out.append(html.escape(line, quote=True).replace("\t", '<span class="ws">→</span>')
                   .replace("\r", '<span class="ws">␍</span>'))
    if not tok:
        out.append('<span class="ws">∅</span>')
    return "".join(out)


# ----------------------------------------------------------------------------------------------------- PNG plot


def robust_ylim(series: Sequence[torch.Tensor]) -> Optional[Tuple[float, float]]:
    """Y-axis limits that keep the bulk of the values when a few are extreme, else ``None`` (automatic limits).

    A few tokens (the first, "attention sink" positions) can project hundreds of times larger than the rest and
    would flatten every other line. When the full range of the finite values exceeds 4x the range between their
    2nd and 98th percentiles, the limits are that inner range padded by a quarter on each side.
    """
    finite = torch.cat([v[torch.isfinite(v)].double() for v in series]) if series else torch.empty(0)
    if finite.numel() < 10:
        return None
    lo, hi = (float(q) for q in torch.quantile(finite, torch.tensor([0.02, 0.98], dtype=torch.float64)))
    span = max(hi - lo, 1e-12)
    if float(finite.max() - finite.min()) <= 4 * span:
        return None
    return lo - 0.25 * span, hi + 0.25 * span


def plot_trace(trace: "Trace", emotions: Union[str, Sequence[str]], path: Union[str, os.PathLike], *,
               site: Union[int, str, None] = None, sequence: int = 0, zscore: Optional[bool] = None, window: int = 1,
               marks: Optional[Sequence[Tuple[int, str]]] = None, title: Optional[str] = None,
               sinks: bool = True) -> Path:
    """Write a PNG line plot of chosen emotions over the tokens of one sequence; returns ``Path(path)``.

    Args:
        trace: the recorded trace.
        emotions: one emotion name or a list of them; one line each, values from
            ``trace.values(e, site=site, sequence=sequence, zscore=z, window=window, mask_sinks=sinks)`` where ``z``
            is ``zscore`` resolved as below.
        path: output file (PNG whatever the suffix); parent directories are created.
        site: site name or index (default: the trace's default site, see :meth:`Trace.site_index`).
        sequence: which sequence of the batch.
        zscore: ``None`` (default): z-scores against the neutral-text statistics when the trace has them
            (:attr:`Trace.has_neutral_stats`), raw projections otherwise.  ``True``: z-scores (raises
            ``ValueError`` from :meth:`Trace.zscores` when the trace has no statistics).  ``False``: projections.
            The y label says which: ``"z-score vs neutral text"`` or ``"projection"``.
        window: trailing moving average over this many tokens (1 = raw values).
        marks: ``(token_index, label)`` pairs drawn as labelled vertical dashed lines, e.g. where a test failed;
            ``token_index`` is a cache position (an index into ``trace.tokens[sequence]``).
        title: figure title (default: site, sequence and the smoothing / z-score settings).
        sinks: ``True`` (default): the attention sinks of this sequence at this site
            (:meth:`Trace.sink_positions`) are **masked**: every line has a gap there, they are left out of the
            moving average and of the y-range, a grey band marks each one and a note in the lower right corner
            says ``"k attention-sink position(s) masked (grey, off scale): t=..."``.  ``False``: plotted like any
            token (the old behaviour; one sink then sets the whole y-range unless :func:`robust_ylim` steps in).

    The y-range is matplotlib's automatic range over the plotted (non-sink) values, unless :func:`robust_ylim`
    still finds a few extreme values among them; then it is that narrower range, with a note counting the values
    off the axis.

    The x axis is the cache position; padding positions are left out.  With at most 60 non-padding tokens the
    ticks are the token strings (leading spaces ``·``, newlines ``↵``), otherwise integer positions.  The generated
    part is shaded grey with a vertical line where it starts.  NaN values (unprocessed positions) leave gaps.

    Only ``matplotlib.figure.Figure`` with an explicit Agg canvas is used: pyplot's global state and the user's
    chosen backend are untouched, and no figure is left registered anywhere.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    if isinstance(emotions, str):
        emotions = [emotions]
    emotions = list(emotions)
    if not emotions:
        raise ValueError("emotions must name at least one emotion; got an empty list")
    sequence = _check_sequence(trace, sequence)
    site_name = _site_name(trace, site)
    T = trace.projections.shape[1]

    keep = ~trace.is_pad[sequence]
    xs = torch.nonzero(keep).flatten()
    if xs.numel() == 0:
        raise ValueError(f"sequence {sequence} is all padding; nothing to plot")
    marks = list(marks or [])
    for idx, label in marks:
        if not 0 <= int(idx) < T:
            raise ValueError(f"mark {label!r} at token_index {idx} is outside the sequence (0 <= index < {T})")
    use_z = _use_zscore(trace, zscore)
    sink = _sink_mask(trace, site, sequence, sinks)
    series = [trace.values(e, site=site, sequence=sequence, zscore=use_z, window=window, mask_sinks=sinks)[xs]
              for e in emotions]

    n = xs.numel()
    label_tokens = n <= MAX_TOKEN_LABELS
    width = 10.0 if n <= 30 else min(4.0 + 0.2 * n, 18.0)
    fig = agg_figure(width, 5.2 if label_tokens else 4.6, dpi=110)
    ax = fig.add_subplot()

    x_np = xs.numpy()
    x_lo, x_hi = float(x_np[0]) - 0.5, float(x_np[-1]) + 0.5
    gen = torch.nonzero(trace.is_generated[sequence]).flatten()
    if gen.numel():
        g0 = float(gen[0]) - 0.5
        ax.axvspan(g0, x_hi, color="0.93", zorder=0, lw=0)
        ax.axvline(g0, color="0.45", lw=1.0, zorder=1)
        ax.text(g0, 1.0, " generated →", transform=ax.get_xaxis_transform(), ha="left", va="bottom",
                fontsize=8, color="0.3", parse_math=False)
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=1)
    sink_ts = torch.nonzero(sink).flatten().tolist()
    for t in sink_ts:
        ax.axvspan(t - 0.5, t + 0.5, color="0.82", zorder=0.5, lw=0)
        if len(sink_ts) <= 12:
            ax.text(t, 0.02, "sink", transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                    fontsize=6.5, color="0.35", parse_math=False, zorder=2)

    cmap = colormaps["tab10" if len(emotions) <= 10 else "tab20"]
    for i, (name, v) in enumerate(zip(emotions, series)):
        # An escaped "$" keeps matplotlib's mathtext from eating names that happen to contain dollar signs.
        ax.plot(x_np, v.numpy(), color=cmap(i % cmap.N), lw=1.6, marker="o" if n <= 40 else None, ms=2.5,
                label=name.replace("$", r"\$"), zorder=3)

    for idx, label in marks:
        ax.axvline(int(idx), color="black", ls="--", lw=1.1, zorder=4)
        ax.text(int(idx), 0.98, f" {label}", transform=ax.get_xaxis_transform(), rotation=90, ha="right",
                va="top", fontsize=8, zorder=5, parse_math=False,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="black", lw=0.6, alpha=0.85))

    ax.set_xlim(x_lo, x_hi)
    notes = []
    if sink_ts:
        shown = ", ".join(map(str, sink_ts[:8])) + (", …" if len(sink_ts) > 8 else "")
        notes.append(f"{len(sink_ts)} attention-sink position(s) masked (grey, off scale): t={shown}")
    limits = robust_ylim(series)
    if limits is not None:
        ax.set_ylim(*limits)
        outside = sum(int(((v < limits[0]) | (v > limits[1])).sum()) for v in series)
        notes.append(f"{outside} outlying value(s) off the axis")
    if notes:
        ax.text(1.0, 0.0, " · ".join(notes) + " ", transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="0.4", parse_math=False, zorder=6,
                bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.8))
    if label_tokens:
        toks = trace.tokens[sequence]
        ax.set_xticks(x_np, labels=[_visible_plain(toks[int(t)], 14) for t in x_np], rotation=90, fontsize=7.5,
                      parse_math=False)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("token")
    ax.set_ylabel(ZSCORE_LABEL if use_z else PROJECTION_LABEL)
    if title is None:
        parts = [site_name, f"sequence {sequence}"]
        if use_z:
            parts.append("z-scored against neutral text")
        if window > 1:
            parts.append(f"moving average over {window} tokens")
        title = " · ".join(parts)
    ax.set_title(title, fontsize=10, parse_math=False, pad=14 if gen.numel() else 6)
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------- HTML heatmap

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; margin: 0 0 .3em 0; }
.meta { font-size: .85em; color: #555; margin-bottom: .6em; }
.meta code { background: #f2f2f2; padding: 0 .3em; border-radius: 3px; }
.legend { display: flex; align-items: center; gap: .5em; font-size: .8em; color: #444; margin: .4em 0 1em 0; }
.legend .bar { width: 240px; height: 12px; border: 1px solid #bbb;
  background: linear-gradient(to right, rgb(NEG), #fff, rgb(POS)); }
.part { border-left: 3px solid #ccc; padding: .2em 0 .6em .8em; margin: 0 0 .8em 0; }
.part.generated { border-left-color: #666; }
.part .label { font-size: .75em; letter-spacing: .08em; text-transform: uppercase; color: #777; margin-bottom: .3em; }
.divider { border-top: 2px dashed #999; margin: .2em 0 .8em 0; }
.text { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 14px;
  line-height: 1.9; white-space: pre-wrap; word-break: break-word; }
.tok { position: relative; padding: 1px 0; border-radius: 2px; cursor: default; }
.tok:hover { outline: 1.5px solid #000; }
.tok.nan { outline: 1px dashed #aaa; }
.tok.sink { background: rgb(SINK); }
.tok.sink::before { content: "\\25B4"; font-size: 9px; color: #555; vertical-align: super; line-height: 0; }
.legend .sinkkey { display: inline-block; width: 1.4em; height: 12px; border: 1px solid #bbb; background: rgb(SINK);
  text-align: center; font-size: 9px; line-height: 12px; color: #555; }
.tok .ws { opacity: .45; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.7em; z-index: 10; min-width: 14em;
  background: #fff; color: #222; border: 1px solid #888; border-radius: 4px; padding: .4em .6em;
  box-shadow: 0 2px 6px rgba(0,0,0,.25); font-size: 12px; line-height: 1.35; white-space: normal; }
.tok:hover .tip { display: block; }
.tip .tt { font-weight: 600; white-space: pre; }
.tip table { border-collapse: collapse; margin-top: .3em; }
.tip td { padding: 0 .5em 0 0; }
.tip td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tip tr.sel td { font-weight: 700; }
select { font-size: .9em; }
"""

# Recolours the tokens when another emotion is chosen; mirrors value_color() exactly.
_JS = """
(function () {
  var data = JSON.parse(document.getElementById("emokern-data").textContent);
  var POS = data.pos, NEG = data.neg, DARK = data.dark;
  function color(s) {
    var e = s >= 0 ? POS : NEG, a = Math.min(1, Math.abs(s));
    return "rgb(" + e.map(function (c) { return Math.round(255 + (c - 255) * a); }).join(",") + ")";
  }
  function show(name) {
    var series = data.series[name];
    document.getElementById("emokern-emotion").textContent = name;
    document.querySelectorAll(".emokern-scale").forEach(function (el) { el.textContent = series.scale_text; });
    document.querySelectorAll(".tok").forEach(function (el) {
      var t = +el.dataset.t, v = series.values[t], vv = el.querySelector(".vv"), vn = el.querySelector(".vn");
      if (vn) vn.textContent = name;
      el.querySelectorAll("tr[data-name]").forEach(function (tr) {
        tr.className = tr.dataset.name === name ? "sel" : "";
      });
      if (el.classList.contains("sink")) {  // grey whatever the emotion; only the tooltip value changes
        if (v !== null) { el.dataset.v = v; if (vv) vv.textContent = v.toFixed(3); }
        return;
      }
      if (v === null) { el.style.background = ""; el.style.color = ""; if (vv) vv.textContent = "n/a"; return; }
      var s = Math.max(-1, Math.min(1, v / series.scale));
      el.style.background = color(s);
      el.style.color = Math.abs(s) > DARK ? "#fff" : "";
      el.dataset.v = v; el.dataset.s = s.toFixed(4);
      if (vv) vv.textContent = v.toFixed(3);
    });
  }
  document.getElementById("emokern-select").addEventListener("change", function (ev) { show(ev.target.value); });
})();
"""


def _json_for_script(obj) -> str:
    # Inside <script>, "</script>" or "<!--" in a name would end the block; escape the markup characters.
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def trace_heatmap_html(trace: "Trace", emotion: str, path: Union[str, os.PathLike], *,
                       site: Union[int, str, None] = None, sequence: int = 0, zscore: Optional[bool] = None,
                       window: int = 1, top_k: int = 5, title: Optional[str] = None,
                       emotions: Optional[Sequence[str]] = None, sinks: bool = True) -> Path:
    """Write one self-contained HTML page with the tokens of one sequence coloured by ``emotion``; returns the path.

    Values: ``zscore=None`` (default) shows z-scores against the neutral-text statistics when the trace has them
    (:attr:`Trace.has_neutral_stats`) and raw projections otherwise; ``True`` forces z-scores (``ValueError`` without
    statistics), ``False`` projections.  The header and legend say which (``"z-score vs neutral text"`` or
    ``"projection"``); tooltips say ``z-score`` / ``projection``.  Call the resolved choice ``z``.

    Attention sinks (``sinks=True``, the default): the positions :meth:`Trace.sink_positions` flags for this
    sequence at this site are drawn in a neutral grey with a small ``▴`` marker (class ``tok sink``, attribute
    ``data-sink="1"``), whatever the emotion; their tooltip gives their true value (unsmoothed, even with
    ``window > 1``) and says they are off the scale; they are left out of the colour scale and of the neighbours'
    moving averages.  The legend counts them.  ``sinks=False`` colours them like any token.

    Colour: the series ``v = trace.values(emotion, site=site, sequence=sequence, zscore=z, window=window,
    mask_sinks=sinks)`` (NaN at sinks) is scaled to [-1, 1] by the 99th percentile of ``|v|`` over the sequence's
    non-padding, non-sink, non-NaN positions (see :func:`scale_values`; values beyond it clip to ±1), then blended
    from white (0) to red (+1) or blue (-1) (:func:`value_color`).  So the non-sink token with the largest ``|v|``
    is fully coloured however large the sinks are.  NaN positions (never fed through the model) are left
    uncoloured with a dashed outline.

    Layout: a header (title, emotion, site, sequence, value kind, smoothing, the scale and a colour legend), then
    the prompt tokens and the generated tokens in separate labelled blocks divided by a dashed rule.  Padding is
    omitted.  Token text is HTML-escaped; leading spaces show as faint ``·``, newlines as ``↵`` followed by a line
    break, tabs as ``→``.

    Hovering a token shows a CSS-only tooltip: position, token, the value of the coloured emotion, and the top
    ``top_k`` emotions at that position (``trace.top_emotions`` over the same series: same site, ``z`` and
    moving-average ``window`` with sinks masked first; at a sink itself, its unsmoothed values); ``top_k=0``
    leaves the list out.

    ``emotions``: optional further emotion names; when it adds any besides ``emotion``, the header gets a dropdown
    that recolours the page among them (values embedded as JSON, a few lines of inline JS, each emotion scaled by
    its own 99th percentile over non-sink positions; sinks stay grey).  Without JS the page still shows
    ``emotion``.  No external resource is referenced.
    """
    sequence = _check_sequence(trace, sequence)
    site_name = _site_name(trace, site)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0; got {top_k}")
    choices = [emotion] + [e for e in (emotions or []) if e != emotion]
    choices = list(dict.fromkeys(choices))

    # Values first: they raise the trace's own errors (unknown emotion, no calibration for zscore, bad window).
    use_z = _use_zscore(trace, zscore)
    series = {e: trace.values(e, site=site, sequence=sequence, zscore=use_z, window=window, mask_sinks=sinks)
              for e in choices}
    sink = _sink_mask(trace, site, sequence, sinks)
    sink_list = sink.tolist()
    # The true values at the sinks (unsmoothed: a sink's own moving average is not meaningful) for the tooltips.
    raw = {e: trace.values(e, site=site, sequence=sequence, zscore=use_z) for e in choices} if any(sink_list) else {}
    scaled, scale = scale_values(series[emotion])
    top = None
    if top_k > 0:
        # Sinks (and padding) are masked before smoothing, as Trace.values masks them, so the tooltip's top
        # emotions come from the same series as the colours; z-scoring is affine per (site, emotion), so it
        # commutes with the moving average.
        sink_rows = torch.zeros_like(trace.is_pad)
        sink_rows[sequence] = sink
        smoothed = trace.smooth(window, mask=sink_rows) if window > 1 else trace
        top = smoothed.top_emotions(top_k, site=site, sequence=sequence, zscore=use_z)
        if any(sink_list):
            top_raw = trace.top_emotions(top_k, site=site, sequence=sequence, zscore=use_z)
            top = [top_raw[t] if sink_list[t] else top[t] for t in range(len(top))]

    T = trace.projections.shape[1]
    toks = trace.tokens[sequence]
    is_pad = trace.is_pad[sequence].tolist()
    is_prompt = trace.is_prompt[sequence].tolist()
    values = [float(raw[emotion][t]) if sink_list[t] else v for t, v in enumerate(series[emotion].tolist())]
    kind = "z-score" if use_z else "projection"
    kind_long = ZSCORE_LABEL if use_z else PROJECTION_LABEL
    if any(sink_list):
        sink_norm = trace.projection_norms(site, sequence)
        valid = ~trace.is_pad[sequence] & torch.isfinite(sink_norm)
        sink_median = float(sink_norm[valid].median())

    def token_span(t: int) -> str:
        v = values[t]
        s = float(scaled[t])
        rgb = value_color(s)
        style, cls = "", "tok"
        if sink_list[t]:
            cls += " sink"
        elif rgb is None:
            cls += " nan"
        else:
            style = f' style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]})'
            style += ';color:#fff"' if abs(s) > _DARK_TEXT_ABOVE else '"'
        tip = [f'<span class="tip"><span>#{t}</span> <span class="tt">{_visible_html(toks[t], breaks=False)}</span>',
               f'<br><span class="vn">{html.escape(emotion)}</span> ({kind}): <span class="vv">{_fmt(v)}</span>']
        if sink_list[t]:
            ratio = float(sink_norm[t]) / sink_median
            tip.append(f"<br><i>attention sink: projection norm {ratio:.0f}× the sequence median; grey, off the "
                       f"colour scale{' (unsmoothed value)' if window > 1 else ''}</i>")
        elif math.isnan(v):
            tip.append("<br><i>not processed (no value at this position)</i>")
        if top is not None and top[t]:
            sel = ' class="sel"'
            rows = "".join(
                f'<tr data-name="{html.escape(name)}"{sel if name == emotion else ""}>'
                f'<td>{html.escape(name)}</td><td class="num">{val:.3f}</td></tr>'
                for name, val in top[t])
            tip.append(f"<table><caption style=\"text-align:left\">top {len(top[t])}</caption>{rows}</table>")
        tip.append("</span>")
        if sink_list[t]:
            data_v = ' data-sink="1"' + ("" if math.isnan(v) else f' data-v="{v:.6g}"')
        else:
            data_v = "" if math.isnan(v) else f' data-v="{v:.6g}" data-s="{s:.4f}"'
        return (f'<span class="{cls}" data-t="{t}"{data_v}{style}>{_visible_html(toks[t], breaks=True)}'
                f'{"".join(tip)}</span>')

    # Consecutive non-padding positions grouped by role; normally one prompt block then one generated block.
    blocks: List[Tuple[str, List[int]]] = []
    for t in range(T):
        if is_pad[t]:
            continue
        role = "prompt" if is_prompt[t] else "generated"
        if blocks and blocks[-1][0] == role:
            blocks[-1][1].append(t)
        else:
            blocks.append((role, [t]))
    body = []
    for i, (role, ts) in enumerate(blocks):
        if i:
            body.append('<div class="divider"></div>')
        label = "prompt" if role == "prompt" else "generated"
        body.append(f'<div class="part {role}"><div class="label">{label} · {len(ts)} tokens</div>'
                    f'<div class="text">{"".join(token_span(t) for t in ts)}</div></div>')
    if not blocks:
        body.append("<p><i>this sequence is all padding</i></p>")

    n_pad = sum(is_pad)
    n_sink = sum(sink_list)
    sink_key = (f'<span class="sinkkey">▴</span><span>{n_sink} attention-sink position(s), grey and off the '
                f'scale (true value in the tooltip)</span>' if n_sink else "")
    if title is None:
        title = f"{emotion} · {site_name} · sequence {sequence}"
    scale_text = f"{scale:.3g}"
    neg_css = ",".join(map(str, _NEG_RGB))
    pos_css = ",".join(map(str, _POS_RGB))
    css = _CSS.replace("NEG", neg_css).replace("POS", pos_css).replace("SINK", ",".join(map(str, _SINK_RGB)))
    picker, script = "", ""
    if len(choices) > 1:
        opts = "".join(f'<option value="{html.escape(e)}"{" selected" if e == emotion else ""}>{html.escape(e)}'
                       f"</option>" for e in choices)
        picker = f' · colour by <select id="emokern-select">{opts}</select>'
        payload = {"pos": list(_POS_RGB), "neg": list(_NEG_RGB), "dark": _DARK_TEXT_ABOVE, "series": {}}
        for e, v in series.items():
            sc = scale_values(v)[1]
            shown_v = [float(raw[e][t]) if sink_list[t] else x for t, x in enumerate(v.tolist())]
            payload["series"][e] = {"scale": sc, "scale_text": f"{sc:.3g}",
                                    "values": [None if math.isnan(x) else round(x, 6) for x in shown_v]}
        script = (f'<script type="application/json" id="emokern-data">{_json_for_script(payload)}</script>\n'
                  f"<script>{_JS}</script>")
    smoothing = f"moving average over {window} tokens" if window > 1 else "raw (no smoothing)"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{css}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">emotion <code id="emokern-emotion">{html.escape(emotion)}</code>{picker}
 · site <code>{html.escape(site_name)}</code> · sequence {sequence} · {kind_long} · {smoothing}
 · {sum(1 for b in blocks for _ in b[1])} tokens shown{f", {n_pad} padding omitted" if n_pad else ""}</div>
<div class="legend"><span>−<span class="emokern-scale">{scale_text}</span></span><span class="bar"></span>
<span>+<span class="emokern-scale">{scale_text}</span></span><span>({kind_long}; white at 0, colour saturates at
 the 99th percentile of |value| over the sequence{"'s non-sink positions" if n_sink else ""}; hover a token for
 details)</span>
{sink_key}</div>
{"".join(body)}
{script}
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
