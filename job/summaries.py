"""TensorBoard logs: `train` and `validation` runs, as Keras' callback names them.

Only the chief writes; other workers get a Summaries whose methods do nothing.
Steps are epochs (1-based), so a resumed run continues the same axis.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf


class Summaries:
    def __init__(self, log_dir: Path | None):
        self._writers = {}
        if log_dir is not None:
            self._writers = {
                run: tf.summary.create_file_writer(str(log_dir / run))
                for run in ("train", "validation")
            }

    def epoch(self, record: dict) -> None:
        step = record["epoch"]
        for run, prefix in (("train", ""), ("validation", "val_")):
            if run in self._writers:
                with self._writers[run].as_default(step=step):
                    tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
                    tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
        self.flush()

    def image(self, name: str, png: bytes, step: int, run: str = "validation") -> None:
        if run in self._writers:
            with self._writers[run].as_default(step=step):
                tf.summary.image(name, tf.image.decode_png(png, channels=4)[tf.newaxis], step=step)
            self.flush()

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
