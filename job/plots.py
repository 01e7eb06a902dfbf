"""Figures, rendered headless to PNG bytes (no display, no pyplot state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

PANELS_PER_ROW = 10


def predictions_panel(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> bytes:
    """The seed's figure: one panel per image titled "Real: X / Predicted: Y",
    in one row as the seed drew its five, wrapped every PANELS_PER_ROW."""
    count = len(images)
    columns = min(max(count, 1), PANELS_PER_ROW)
    rows = max(1, -(-count // PANELS_PER_ROW))
    fig = Figure(figsize=(2 * columns, 4 * rows))
    for i in range(count):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.axis("off")
        ax.set_title(f"Real: {labels[i]}\nPredicted: {predicted[i]}")
    return to_png(fig)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


CONFUSION_MATRIX_INCHES = (7, 6)  # at 100 dpi: 700x600 pixels
GALLERY_INCHES = (8, 11)  # at 100 dpi: 800x1100 pixels
GALLERY_COLUMNS = 5


def confusion_matrix(confusion: np.ndarray, accuracy: float) -> bytes:
    """Counts [true, predicted]; colour is the share of each true digit's row,
    so the off-diagonal mistakes stay visible next to the large diagonal."""
    # Default layout: it fits here, and "constrained" costs 0.1 s a figure.
    fig = Figure(figsize=CONFUSION_MATRIX_INCHES)
    ax = fig.add_subplot()
    rows = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    # Ten by ten cells as quads, not an image: imshow would resample it to the
    # figure's pixels through a float64 copy (~10 MB at the run's memory peak).
    edges = np.arange(confusion.shape[0] + 1) - 0.5
    shown = ax.pcolormesh(edges, edges, shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # true digit 0 at the top, as a matrix is read
    fig.colorbar(shown, ax=ax, label="share of the true digit")
    for (true, predicted), count in np.ndenumerate(confusion):
        colour = "white" if shares[true, predicted] > 0.5 else "black"
        ax.text(predicted, true, str(count), ha="center", va="center", color=colour, fontsize=8)
    ticks = range(confusion.shape[0])
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({confusion.sum()} images, accuracy {accuracy:.2%})")
    return to_png(fig)


def misclassified_gallery(
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    total: int,
) -> bytes:
    """Up to 5x5 mistakes, one panel each: true digit, prediction, its probability.

    Drawn as one mosaic image with captions: 25 separate axes cost seconds.
    """
    columns, side, gap, caption = GALLERY_COLUMNS, 28, 4, 14  # in image pixels
    cell_w, cell_h = side + gap, side + gap + caption
    mosaic = np.zeros((columns * cell_h, columns * cell_w), np.uint8)
    drawn = np.zeros(mosaic.shape, bool)  # the digits' pixels; the rest is paper
    fig = Figure(figsize=GALLERY_INCHES)
    ax = fig.add_axes((0.01, 0.0, 0.98, 0.94))
    ax.set(xlim=(0, mosaic.shape[1]), ylim=(mosaic.shape[0], 0), aspect="equal")
    ax.axis("off")
    for i in range(min(len(images), columns * columns)):
        top, left = (i // columns) * cell_h + caption, (i % columns) * cell_w + gap // 2
        mosaic[top : top + side, left : left + side] = images[i]
        drawn[top : top + side, left : left + side] = True
        ax.text(
            left + side / 2,
            top - 1,
            f"true {labels[i]}, predicted {predicted[i]}\np = {confidence[i]:.2f}",
            ha="center",
            va="bottom",
            fontsize=10,
        )
    shown = f", the {len(images)} most confident" if total else ""
    fig.suptitle(f"Misclassified: {total}{shown}")
    return _with_image(fig, ax, mosaic, drawn)


def _with_image(fig: Figure, ax, image: np.ndarray, drawn: np.ndarray) -> bytes:
    """The figure as PNG, with the grey `image` (where `drawn`) filling `ax`.

    Pasted into the rendered figure rather than drawn by imshow, whose
    resampling to the figure's 800x1100 pixels holds a float64 copy of them
    (~30 MB): that was the training run's peak of memory.
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    figure = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    box = ax.get_window_extent()  # pixels from the bottom left, after the aspect
    size = (round(box.width), round(box.height))
    scaled = Image.fromarray(image).resize(size, Image.Resampling.NEAREST).convert("RGBA")
    mask = Image.fromarray(drawn).resize(size, Image.Resampling.NEAREST)
    figure.paste(scaled, (round(box.x0), figure.height - round(box.y1)), mask)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    return buffer.getvalue()
