"""Matplotlib figures that never touch pyplot: each :class:`~matplotlib.figure.Figure` gets its own Agg canvas, so
savefig renders PNGs whatever backend the user has chosen, no global state changes (no ``matplotlib.use``), and no
figure stays registered anywhere after it is dropped. matplotlib is imported on the first call, not at import."""

from __future__ import annotations

__all__ = ["agg_figure"]


def agg_figure(width: float, height: float, *, dpi: float = 100, layout: str = "constrained"):
    """A new ``Figure(figsize=(width, height), dpi=dpi, layout=layout)`` (inches) attached to its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg whatever the global backend
    return fig
