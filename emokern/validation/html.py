"""The pieces every section of the validation report's page is made of: escaped text, numbers as the page shows
them, tables, PNG figures (saved beside the page and embedded in it as ``data:`` URIs, so the page is one
self-contained file). Used by the report's page (:mod:`emokern.validation.report_page`) and by sections 5-7
(:mod:`emokern.validation.concept_checks`, :mod:`emokern.validation.concept_plots`). matplotlib is imported only when
a figure is made."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional, Sequence

from emokern.util.figures import agg_figure

__all__ = ["PNG_DPI", "embedded_png", "escape", "format_number", "html_table", "new_figure", "save_png"]

#: Resolution of every PNG of the report.
PNG_DPI = 110


def new_figure(width: float, height: float):
    """A figure of the report: ``width`` x ``height`` inches at :data:`PNG_DPI`, constrained layout, on its own Agg
    canvas (:func:`emokern.util.figures.agg_figure`: the user's matplotlib backend is never touched)."""
    return agg_figure(width, height, dpi=PNG_DPI)


def escape(x) -> str:
    """``str(x)`` with ``&``, ``<``, ``>`` and both quotes escaped for HTML text and attribute values."""
    return html.escape(str(x))


def format_number(x, digits: int = 3) -> str:
    """A number as the page shows it: an int as is, any other number with ``digits`` decimals; ``None`` as an em
    dash."""
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def html_table(header: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    """A ``<table>`` (with ``class="cls"`` when given): ``header`` escaped in ``<th>`` cells; each row's numbers and
    ``None`` right-aligned through :func:`format_number`, anything else inserted as given (HTML: escape text
    first)."""
    def cell(x) -> str:
        if isinstance(x, (int, float)) or x is None:
            return f'<td class="num">{format_number(x)}</td>'
        return f"<td>{x}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(x) for x in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def save_png(fig, path: Path) -> str:
    """Save the matplotlib figure ``fig`` as a PNG at ``path``; returns the file's name (what the report records
    and :func:`embedded_png` reads back from the output folder)."""
    fig.savefig(path, format="png")
    return path.name


def embedded_png(out_dir: Path, name: Optional[str], caption: str) -> str:
    """A ``<figure>`` showing ``out_dir / name`` inline as a base64 ``data:`` URI, with ``caption`` and a link to
    the file; ``""`` when ``name`` is empty or ``None`` (a plot that was not drawn)."""
    if not name:
        return ""
    data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{escape(caption)} (<a href="{escape(name)}">{escape(name)}</a>)</figcaption></figure>')
