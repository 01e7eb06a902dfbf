"""TensorBoard logs: `train` and `validation` runs, as Keras' callback names them.

Only the chief writes; other workers get a Summaries whose methods do nothing.
Steps are epochs (1-based), so a resumed run continues the same axis, except
`batch_loss`, whose step is the global training step: it is written at the end
of each compiled chunk of steps (every --checkpoint-every steps, else once per
epoch), since the steps inside a chunk run as one call with no way out.
The log dir itself holds the hparams (config and final test metrics) and the
test metrics as scalars, where TensorBoard's hparams dashboard looks for them.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

# The settings the hparams dashboard shows for a run. No experiment config is
# written: TensorBoard then infers each hparam's type and values, and takes
# every scalar of the run (test_*, epoch_*, ...) as a metric, across all the
# runs it serves.
HPARAMS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "hidden_units",
    "seed",
    "deterministic",
    "train_images",
    "strategy",
    "replicas",
)


class Summaries:
    def __init__(self, log_dir: Path | None):
        self._writers = {}
        if log_dir is not None:
            self._writers = {
                run: tf.summary.create_file_writer(str(log_dir / run))
                for run in ("train", "validation", "")
            }

    def epoch(self, record: dict, learning_rate: float | None = None) -> None:
        step = record["epoch"]
        for run, prefix in (("train", ""), ("validation", "val_")):
            if run in self._writers:
                with self._writers[run].as_default(step=step):
                    tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
                    tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
        if learning_rate is not None and "train" in self._writers:
            with self._writers["train"].as_default(step=step):
                tf.summary.scalar("learning_rate", learning_rate)
        self.flush()

    def chunk(self, global_step: int, mean_loss: float) -> None:
        """Mean training loss of the chunk of steps that ended at `global_step`."""
        if "train" in self._writers:
            with self._writers["train"].as_default(step=global_step):
                tf.summary.scalar("batch_loss", mean_loss)

    def graph(self, model) -> None:
        """The model's forward pass, for TensorBoard's Graphs tab."""
        if "train" in self._writers:
            spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
            forward = tf.function(lambda x: model(x, training=False))
            with self._writers["train"].as_default():
                tf.summary.graph(forward.get_concrete_function(spec).graph)
            self.flush()

    def hparams(self, settings: dict, test_metrics: dict, step: int) -> None:
        """The hparams dashboard: this run's settings (the HPARAMS among
        `settings`) next to its results (`test_metrics` and the epoch scalars)."""
        if "" in self._writers:
            hparams = {name: _hparam(settings[name]) for name in HPARAMS if name in settings}
            with self._writers[""].as_default(step=step):
                hp.hparams(hparams)
                for name, value in test_metrics.items():
                    tf.summary.scalar(f"test_{name}", value)
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
        """Flush and close every writer. Safe to call again; from then on this
        Summaries writes nothing, as one for a worker that does not write."""
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()


def _hparam(value):
    """The dashboard takes bool, int, float and str only."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "none" if value is None else value
