"""Figures, rendered headless to PNG bytes (no display, no pyplot state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def predictions_panel(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> bytes:
    """The seed's figure: one panel per image titled "Real: X / Predicted: Y"."""
    count = len(images)
    fig = Figure(figsize=(2 * max(count, 1), 4))
    for i in range(count):
        ax = fig.add_subplot(1, count, i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.axis("off")
        ax.set_title(f"Real: {labels[i]}\nPredicted: {predicted[i]}")
    return to_png(fig)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
