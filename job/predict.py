"""`mnist-job predict`: classify the user's own images, prepared the way MNIST was made.

MNIST digits are white on black, cropped to the ink, scaled (anti-aliased) to fit
a 20x20 box with their aspect ratio kept, and placed in a 28x28 field so that
their centre of mass is at its centre. A photo or a scan goes through the same
steps here, so the model sees what it was trained on. Nothing here imports
TensorFlow; `predict_files` takes a loaded model.

Only the formats in FORMATS are opened: Pillow knows dozens, and some of them
are risky to hand a stranger's file to (EPS runs Ghostscript).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

FIELD = 28  # MNIST's image size
BOX = 20  # the digit's longer side, as in MNIST
CENTRE = 14.0  # where MNIST puts the centre of mass (row/column index)
MAX_SIDE = 1024  # bigger inputs are reduced first: enough for a digit, bounded cost
DENOISE_FROM = 64  # images this small (MNIST-sized) have strokes a median filter would eat
MIN_CONTRAST = 0.08  # ink must differ from the paper by this much (of full scale)

# The image formats predict opens (Pillow's names), and how messages list them.
# docs/using-the-model.md and `mnist-job predict --help` list the same ones.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
EXPECTED = "PNG, JPEG, BMP, GIF, TIFF or WebP expected"

# Bidirectional embeddings, overrides and isolates: they reorder what a
# terminal shows, so a name could display as something it is not.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class BadImage(Exception):
    """A file that cannot be classified; the message is one short line."""


@dataclass
class Prediction:
    file: str
    digit: int
    probability: float
    top3: list[tuple[int, float]]

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "digit": self.digit,
            "probability": self.probability,
            "top3": [{"digit": d, "probability": p} for d, p in self.top3],
        }

    def line(self) -> str:
        top = ", ".join(f"{d} {p:.1%}" for d, p in self.top3)
        return f"{printable(self.file)}: {self.digit} ({self.probability:.1%})  top-3: {top}"


def printable(text: str) -> str:
    """`text` with its control characters escaped as Python writes them
    (`\\n`, `\\t`, `\\x1b`, `\\u202e`), so a file name prints on one line and
    cannot forge another line or move the cursor; other characters (accents,
    CJK, emoji) are left as they are. Names that were not valid UTF-8 (lone
    surrogates here) are escaped too, rather than failing to print."""
    return "".join(
        repr(c)[1:-1]
        if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI_CONTROLS
        else c
        for c in text
    )


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image (so a truncated file fails here), upright.

    Only FORMATS are tried; a file in any other format is refused before any
    of its data is decoded.
    """
    try:
        if path.is_dir():
            raise BadImage("is a directory (give the image files in it, e.g. DIR/*.png)")
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with Image.open(path, formats=FORMATS) as image:
            image.load()
            # Phone photos are often stored sideways with an EXIF rotation tag.
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise BadImage("no such file") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except UnidentifiedImageError:
        other = _other_format(path)
        if other:
            raise BadImage(f"unsupported format {other} ({EXPECTED})") from None
        raise BadImage(f"not an image that can be read ({EXPECTED})") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0] or type(err).__name__
        raise BadImage(f"unreadable or truncated: {reason}") from None


def _other_format(path: Path) -> str | None:
    """The format, outside FORMATS, that Pillow would take the file for, judged
    by its first bytes only (as Image.open does before it picks a decoder)."""
    try:
        with path.open("rb") as file:
            prefix = file.read(16)
    except OSError:
        return None
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name not in FORMATS and accept is not None and accept(prefix):
            return name
    return None


def preprocess(image: Image.Image) -> np.ndarray:
    """Any image of one digit -> a 28x28 uint8 MNIST-style image (white on black)."""
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    grey = _grey(image)
    if min(grey.shape) >= DENOISE_FROM:
        # A 3x3 median removes salt-and-pepper noise from photos and scans
        # before anything is measured; strokes that large are wider than that.
        grey = np.asarray(Image.fromarray(grey).filter(ImageFilter.MedianFilter(3))).copy()
    ink = _ink_up(grey)
    threshold = _otsu(ink)
    mask = ink > threshold
    if ink.max() < MIN_CONTRAST or not mask.any():
        raise BadImage("no digit found: the image is blank or has no contrast")
    # Stroke cores become full white, the paper and its noise black; the ramp
    # between keeps edges anti-aliased, as MNIST's are.
    level = float(np.median(ink[mask]))
    low = threshold / 2
    ink = np.clip((ink - low) / max(level - low, 1e-6), 0.0, 1.0)

    top, bottom = _span(mask.sum(axis=1))
    left, right = _span(mask.sum(axis=0))
    digit = ink[top:bottom, left:right]
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    scaled = Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)
    digit = np.clip(np.asarray(scaled), 0.0, 1.0)
    return (_centre(digit) * 255).round().astype(np.uint8)


def predict_files(model, paths: list[Path], save_dir: Path | None = None) -> list:
    """One entry per path, in order: a Prediction, or a BadImage for that file."""
    results: list = [None] * len(paths)
    images, positions = [], []
    for i, path in enumerate(paths):
        try:
            images.append(preprocess(read_image(path)))
            positions.append(i)
        except BadImage as err:
            results[i] = BadImage(f"{path}: {err}")
    if save_dir is not None:
        _save_preprocessed(save_dir, [paths[i] for i in positions], images)
    if images:
        batch = np.stack(images).astype(np.float32) / 255.0
        probabilities = np.asarray(model.predict(batch, verbose=0))
        for i, p in zip(positions, probabilities, strict=True):
            order = np.argsort(p)[::-1][:3]
            results[i] = Prediction(
                file=str(paths[i]),
                digit=int(order[0]),
                probability=float(p[order[0]]),
                top3=[(int(d), float(p[d])) for d in order],
            )
    return results


def _grey(image: Image.Image) -> np.ndarray:
    """Luminance in [0, 1] as float32; transparency is flattened onto a paper
    colour that contrasts with the ink (black strokes on a clear background
    become black on white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if values.max() > 255 else 255.0
        return np.clip(values / top, 0.0, 1.0)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            opaque = alpha > 0.5
            ink_is_dark = not opaque.any() or grey[opaque].mean() < 0.5
            paper = 1.0 if ink_is_dark else 0.0
            return grey * alpha + paper * (1.0 - alpha)
        return grey
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _ink_up(grey: np.ndarray) -> np.ndarray:
    """Ink as positive values over a zero background, whatever the polarity.

    The paper is what the border shows; the ink is the side of the grey range
    that lies farther from it (works for grey paper and uneven light too).
    """
    margin = max(1, min(grey.shape) // 20)
    border = np.concatenate(
        [
            grey[:margin].ravel(),
            grey[-margin:].ravel(),
            grey[:, :margin].ravel(),
            grey[:, -margin:].ravel(),
        ]
    )
    paper = float(np.median(border))
    darkest, brightest = float(grey.min()), float(grey.max())
    ink = paper - grey if paper - darkest > brightest - paper else grey - paper
    return np.clip(ink, 0.0, None)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold: the split of the histogram with the most between-class variance."""
    top = float(values.max())
    if top <= 0:
        return 0.0
    counts, edges = np.histogram(values, bins=256, range=(0.0, top))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts).astype(np.float64)
    mass = np.cumsum(counts * centres)
    total, total_mass = weight[-1], mass[-1]
    below, above = weight[:-1], total - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mass[:-1] / below
        mean_above = (total_mass - mass[:-1]) / above
        between = below * above * (mean_below - mean_above) ** 2
    between = np.nan_to_num(between)
    return float(edges[1:][np.argmax(between)])


def _span(profile: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the ink along one axis.

    Runs of inked rows (or columns) that hold little ink and lie far from the
    main run are dust or noise, not part of the digit, and are left out.
    """
    occupied = np.flatnonzero(profile)
    breaks = np.flatnonzero(np.diff(occupied) > 1)
    starts = np.concatenate([occupied[:1], occupied[breaks + 1]])
    stops = np.concatenate([occupied[breaks], occupied[-1:]]) + 1
    masses = [profile[a:b].sum() for a, b in zip(starts, stops, strict=True)]
    total = sum(masses)
    main = int(np.argmax(masses))
    reach = 0.3 * (stops[main] - starts[main])
    kept = [
        i
        for i in range(len(starts))
        if masses[i] >= 0.05 * total
        or max(starts[i] - stops[main], starts[main] - stops[i]) <= reach
    ]
    return int(starts[kept].min()), int(stops[kept].max())


def _centre(digit: np.ndarray) -> np.ndarray:
    """Place the digit in the 28x28 field with its centre of mass at the centre."""
    height, width = digit.shape
    rows, cols = np.mgrid[:height, :width]
    mass = digit.sum()
    cy = (rows * digit).sum() / mass if mass else height / 2
    cx = (cols * digit).sum() / mass if mass else width / 2
    top = int(np.clip(round(CENTRE - cy), 0, FIELD - height))
    left = int(np.clip(round(CENTRE - cx), 0, FIELD - width))
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def _save_preprocessed(save_dir: Path, paths: list[Path], images: list[np.ndarray]) -> None:
    from job import artifacts

    used: set[str] = set()
    for path, image in zip(paths, images, strict=True):
        name, n = f"{path.stem}.png", 1
        while name in used:  # same file name from different directories
            name, n = f"{path.stem}-{n}.png", n + 1
        used.add(name)
        with artifacts.atomic_path(save_dir / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    log.info("Wrote %d preprocessed 28x28 image(s) to %s", len(images), printable(str(save_dir)))
