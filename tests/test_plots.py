"""job.plots: each figure is a valid PNG of its documented size, also at the
edges (a run with no mistakes, a digit missing from the test images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from job.plots import (
    CONFUSION_MATRIX_INCHES,
    GALLERY_COLUMNS,
    GALLERY_INCHES,
    confusion_matrix,
    misclassified_gallery,
    predictions_panel,
)

DPI = 100


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking it is one and is complete."""
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


@pytest.mark.parametrize(
    ("count", "size"),
    [
        (1, (200, 400)),  # 2 x 4 inches a panel
        (5, (1000, 400)),  # the seed's five, in one row
        (10, (2000, 400)),
        (11, (2000, 800)),  # wraps after ten
        (25, (2000, 1200)),  # 10 panels across, 3 rows
    ],
)
def test_predictions_panel_has_one_panel_per_image_wrapped_every_ten(tiny, count, size):
    images, labels = tiny.x_test[:count], tiny.y_test[:count]
    assert png_size(predictions_panel(images, labels, labels)) == size


def inches_to_pixels(inches: tuple[int, int]) -> tuple[int, int]:
    return inches[0] * DPI, inches[1] * DPI


def test_confusion_matrix_is_a_png_of_its_documented_size():
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 50, (10, 10)) + np.diag(np.full(10, 900))
    png = confusion_matrix(confusion, accuracy=0.9)
    assert png_size(png) == inches_to_pixels(CONFUSION_MATRIX_INCHES) == (700, 600)


def test_confusion_matrix_renders_a_digit_missing_from_the_test_images():
    # --max-test-samples or a small set: a row of zeros must not divide by zero.
    confusion = np.diag(np.full(10, 5))
    confusion[3, 3] = 0
    with np.errstate(all="raise"):
        png = confusion_matrix(confusion, accuracy=1.0)
    assert png_size(png) == inches_to_pixels(CONFUSION_MATRIX_INCHES)


def gallery(tiny, count: int, total: int) -> bytes:
    images, labels = tiny.x_test[:count], tiny.y_test[:count]
    confidence = np.linspace(0.99, 0.5, count)
    return misclassified_gallery(images, labels, (labels + 1) % 10, confidence, total)


@pytest.mark.parametrize(
    ("count", "total"),
    [
        (7, 7),
        (GALLERY_COLUMNS**2, 40),  # a full gallery, the most confident of 40 mistakes
        (GALLERY_COLUMNS**2 + 5, 30),  # more than fit: the rest are left out
    ],
)
def test_misclassified_gallery_is_a_png_of_its_documented_size(tiny, count, total):
    size = png_size(gallery(tiny, count, total))
    assert size == inches_to_pixels(GALLERY_INCHES) == (800, 1100)


def test_a_gallery_with_no_mistakes_still_renders(tiny):
    assert png_size(gallery(tiny, 0, 0)) == inches_to_pixels(GALLERY_INCHES)
