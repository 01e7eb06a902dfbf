"""`mnist-job evaluate`: how a trained model does on the MNIST test set, and where it fails.

`report` and `figures` work from predicted probabilities alone, so `train`
reuses them on its final evaluation instead of evaluating a second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.config import NUM_CLASSES

log = logging.getLogger(__name__)

EPSILON = 1e-7  # Keras clips probabilities to [eps, 1 - eps] before the log
GALLERY_SIZE = 25  # panels in misclassified.png: the most confident mistakes
FIGURE_NAMES = ("confusion_matrix", "misclassified")


@dataclass
class Report:
    images: int
    loss: float
    accuracy: float
    confusion: np.ndarray  # [true, predicted] counts, 10x10

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> list[float | None]:
        """Per digit; None for a digit the model never predicted."""
        predicted = self.confusion.sum(axis=0)
        return [float(self.confusion[d, d] / n) if n else None for d, n in enumerate(predicted)]

    @property
    def recall(self) -> list[float | None]:
        """Per digit; None for a digit absent from the data."""
        return [float(self.confusion[d, d] / n) if n else None for d, n in enumerate(self.support)]

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "classes": [
                {"digit": d, "precision": p, "recall": r, "support": int(n)}
                for d, (p, r, n) in enumerate(
                    zip(self.precision, self.recall, self.support, strict=True)
                )
            ],
            "confusion_matrix": self.confusion.tolist(),
        }

    def text(self) -> str:
        lines = [
            f"test loss {self.loss:.4f}, accuracy {self.accuracy:.4f} ({self.images} images)",
            "digit  precision  recall  support",
        ]
        for d, (p, r, n) in enumerate(zip(self.precision, self.recall, self.support, strict=True)):
            lines.append(f"{d:>5}  {_fraction(p):>9}  {_fraction(r):>6}  {n:>7}")
        return "\n".join(lines)


def report(labels: np.ndarray, probabilities: np.ndarray) -> Report:
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return Report(
        images=len(labels),
        loss=float(-np.log(picked).mean()),
        accuracy=float((predicted == labels).mean()),
        confusion=confusion,
    )


def figures(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """{"confusion_matrix": png, "misclassified": png} for one evaluation."""
    from job.plots import confusion_matrix, misclassified_gallery

    result = report(labels, probabilities)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:GALLERY_SIZE]
    return {
        "confusion_matrix": confusion_matrix(result.confusion, result.accuracy),
        "misclassified": misclassified_gallery(
            images[worst], labels[worst], predicted[worst], confidence[worst], len(wrong)
        ),
    }


def evaluate(model: Path | str, data_dir: Path | str, output_dir: Path | str, datasets=None):
    """Evaluate `model` (a model.keras or an output dir; a path or a URI) on
    the test set; write both figures to `output_dir`. Returns (Report, paths)."""
    from job import inputs

    loaded = inputs.load_model(model)
    _check_writable(output_dir)
    if datasets is None:
        datasets = inputs.load_data(data_dir)
    images, labels = datasets.x_test, datasets.y_test
    probabilities = np.asarray(loaded.predict(images / np.float32(255), batch_size=1000, verbose=0))
    result = report(labels, probabilities)
    paths = _write_figures(output_dir, figures(images, labels, probabilities))
    log.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    return result, paths


def _check_writable(output_dir: Path | str) -> None:
    from job import artifacts, storage

    if storage.is_uri(output_dir):
        storage.check_writable(output_dir, "output dir")
    else:
        artifacts.ensure_writable_dir(output_dir, "output dir")


def _write_figures(output_dir: Path | str, pngs: dict[str, bytes]) -> dict:
    """Each figure as `<name>.png`, written whole. Not into a dir a training
    run holds: it writes figures of these names too."""
    from job import artifacts, bucketlock, dirlock, storage

    if storage.is_uri(output_dir):
        paths = {name: storage.join(output_dir, f"{name}.png") for name in pngs}
        with bucketlock.held(output_dir):
            for name, png in pngs.items():
                storage.write_bytes(paths[name], png)
        return paths
    paths = {name: Path(output_dir) / f"{name}.png" for name in pngs}
    with dirlock.held(Path(output_dir)):
        for name, png in pngs.items():
            artifacts.write_bytes(paths[name], png)
    return paths


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
