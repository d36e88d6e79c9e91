"""Figures drawn off-screen to PNG bytes: the dataset card's plots and the dashboard's.

Each figure gets its own Agg canvas, so nothing sets matplotlib's global backend or
touches pyplot: the dashboard draws inside Airflow's api-server, which is not ours.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def figure(width: float, height: float) -> Figure:
    """A new figure of ``width`` × ``height`` inches, constrained layout, Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg on this figure only: no pyplot, no global backend
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # PNG metadata would only hold matplotlib's "Software" tag; None leaves it out.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()
