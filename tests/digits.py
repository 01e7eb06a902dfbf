"""Synthetic "photos" of digits for predict's tests, made on the spot.

Digits are drawn with the TrueType fonts that matplotlib ships (DejaVu, STIX),
at random sizes, positions and slants, dark on light or light on dark, in
grey or tinted colour, with sensor-like noise and uneven light.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
)
MODES = ("L", "RGB")


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / name), size)


def render(digit: int, rng: np.random.Generator, mode: str | None = None, dark_ink=None):
    """One digit somewhere on a canvas of random size: a PIL image."""
    width, height = (int(v) for v in rng.integers(36, 140, 2))
    size = int(rng.uniform(0.35, 0.8) * min(width, height))
    face = font(FONTS[rng.integers(len(FONTS))], size)
    # Draw the glyph on its own layer, slant it a little, then put it anywhere
    # on the canvas where it fits whole.
    left, top, right, bottom = face.getbbox(str(digit))
    glyph = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(glyph).text((2 - left, 2 - top), str(digit), fill=255, font=face)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC, expand=True)
    glyph.thumbnail((width - 2, height - 2))
    x = int(rng.integers(0, width - glyph.width + 1))
    y = int(rng.integers(0, height - glyph.height + 1))
    ink = np.zeros((height, width), np.float32)
    ink[y : y + glyph.height, x : x + glyph.width] = np.asarray(glyph, np.float32) / 255

    if dark_ink is None:
        dark_ink = bool(rng.integers(2))
    paper_level, ink_level = rng.uniform(0.7, 1.0), rng.uniform(0.0, 0.3)
    if not dark_ink:
        paper_level, ink_level = 1 - paper_level, 1 - ink_level
    mode = mode or MODES[rng.integers(len(MODES))]
    channels = 3 if mode == "RGB" else 1
    tint = rng.uniform(0.8, 1.0, channels)  # coloured paper and ink
    light = np.linspace(0, rng.uniform(-0.1, 0.1), width)[None, :, None]  # uneven light
    pixels = (paper_level + (ink_level - paper_level) * ink[..., None]) * tint + light
    pixels += rng.normal(0, rng.uniform(0, 0.04), pixels.shape)
    pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def dataset(count: int, seed: int):
    """`count` (image, label) pairs, labels cycling 0-9."""
    rng = np.random.default_rng(seed)
    return [(render(i % 10, rng), i % 10) for i in range(count)]
