"""A run's outputs: the output dir, claimed before training (checked and
locked), and the chief's last act after it: the model, the figures, then
metrics.json.

metrics.json is written last, so that its presence means the run finished; a
dir that holds one is a finished run, which only --overwrite replaces, and
only once the new run has passed every check.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from job import artifacts, checkpoint, dirlock
from job.config import TrainConfig
from job.errors import ConfigError
from job.mirror import Mirror

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """What training hands over to be written."""

    model: object  # keras.Model, its variables possibly distributed
    optimizer: object  # its keras optimizer, whose state the saved model keeps
    evaluation: object  # job.loop.Evaluation on the test set: loss, accuracy, probabilities
    test_images: np.ndarray  # uint8, for the figures
    test_labels: np.ndarray


@contextlib.contextmanager
def claimed(config: TrainConfig, is_chief: bool, mirror: Mirror | None = None) -> Iterator[None]:
    """The output dir, held by this run for the block. Fails before anything
    else if a dir we write cannot take files, if another run holds the output
    dir, or if it holds a finished run that is not to be replaced. Only the
    chief writes and holds the lock; every worker refuses a finished run, so
    that none waits for a chief that will not come. `config` is the run's
    local one (mirror.local); the mirror checks and locks the bucket dirs."""
    mirror = mirror or Mirror(config)
    if is_chief:
        _check_writable(config)
        with dirlock.held(config.output_dir), mirror.claimed(is_chief):
            _refuse_finished_run(config, mirror)
            yield
    else:
        with mirror.claimed(is_chief):
            _refuse_finished_run(config, mirror)
            yield


def _check_writable(config: TrainConfig) -> None:
    for path, what in (
        (config.output_dir, "output dir"),
        # Dirs set apart from the output dir; the defaults inside it are made
        # when first written, so a run that fails its checks leaves none behind.
        (config.model_dir, "model dir"),
        (config.checkpoint_dir, "checkpoint dir"),
        (config.tensorboard_dir, "TensorBoard dir"),
    ):
        if path is not None:
            artifacts.ensure_writable_dir(path, what)


def finished(config: TrainConfig, mirror: Mirror) -> bool:
    """Whether the output dir (in the bucket, if it is one) holds a finished run."""
    return mirror.finished() if mirror.output_uri else config.metrics_path.exists()


def _refuse_finished_run(config: TrainConfig, mirror: Mirror) -> None:
    if mirror.output_uri:
        return  # the mirror refused it, from the bucket
    if config.metrics_path.exists() and not config.overwrite:
        raise ConfigError(
            f"{config.output_dir} holds a finished run (metrics.json): "
            "pass --overwrite to replace it, or choose another --output-dir"
        )


def discard_finished_run(config: TrainConfig, mirror: Mirror | None = None) -> None:
    mirror = mirror or Mirror(config)
    log.warning("--overwrite: replacing the finished run in %s", mirror.shown(config.output_dir))
    # The metrics go first, so an interrupted overwrite never looks finished;
    # then the old model, which predict and evaluate would otherwise still use
    # beside the new run's checkpoint.
    config.metrics_path.unlink(missing_ok=True)
    mirror.delete(config.metrics_path)
    config.model_path.unlink(missing_ok=True)
    mirror.delete(config.model_path)
    shutil.rmtree(config.saved_model_path, ignore_errors=True)
    mirror.delete(config.saved_model_path)
    discard_training_state(config, mirror)


def discard_training_state(config: TrainConfig, mirror: Mirror | None = None) -> None:
    mirror = mirror or Mirror(config)
    """The checkpoint and logs, local and in the bucket."""
    checkpoint.discard_training_state(config)
    mirror.delete(config.checkpoint_path.parent)
    mirror.delete(config.tensorboard_path)


def metrics(
    config: TrainConfig,
    placement,
    state: checkpoint.TrainState,
    evaluation,
    resumed_from: dict | None,
    timings: dict,
) -> dict:
    """What metrics.json records about the run (every worker computes it)."""
    steps_per_epoch = state.steps_per_epoch
    start_step = 0
    if resumed_from:
        start_step = resumed_from["epoch"] * steps_per_epoch + resumed_from["step"]
    trained_images = (config.epochs * steps_per_epoch - start_step) * config.batch_size
    return {
        "config": config.to_dict(),
        "history": state.history,
        "test": {"loss": evaluation.loss, "accuracy": evaluation.accuracy},
        "resumed_from": resumed_from,
        "timings": timings,
        # None when a resumed run had nothing left to train.
        "throughput": {
            "train_images_per_second": (
                trained_images / timings["fit_seconds"] if trained_images else None
            )
        },
        "versions": versions(),
        "devices": {
            "strategy": placement.strategy_name,
            "replicas": placement.num_replicas,
            "workers": max(1, placement.cluster.num_workers),
            "gpus": placement.gpus,
            "cpu_threads": placement.cpu_threads,
        },
        "train_images": state.fingerprint["train_size"],
    }


def versions() -> dict:
    """What ran: metrics.json and `mnist-job info` report the same. Imports
    TensorFlow; `info` calls it only once TensorFlow imported."""
    import keras
    import tensorflow as tf

    import job

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "mnist_job": job.__version__,
    }


def publish(
    config: TrainConfig,
    trained: Trained,
    metrics: dict,
    summaries,
    started: float,
    mirror: Mirror | None = None,
):
    """The chief's last act: every artifact, then metrics.json, on disk and
    then in the bucket. `started`: the run's perf_counter() start, for the
    total time it records. Returns the model as saved (a plain keras.Model)."""
    mirror = mirror or Mirror(config)
    artifacts_started = time.perf_counter()
    epochs_done = len(metrics["history"])
    saved = _write_artifacts(config, trained, summaries, epochs_done)
    metrics["timings"]["artifacts_seconds"] = time.perf_counter() - artifacts_started
    metrics["timings"]["total_seconds"] = time.perf_counter() - started
    summaries.hparams(
        {**metrics["config"], **metrics["devices"], "train_images": metrics["train_images"]},
        metrics["test"],
        step=epochs_done,
    )
    summaries.flush()
    mirror.publish_artifacts()
    # Last, so that its presence means the run finished.
    artifacts.write_json(config.metrics_path, metrics)
    mirror.publish_metrics()
    log.info(
        "Wrote model, logs, predictions and metrics to %s",
        mirror.shown(config.output_dir),
        extra={"event": "end", "test": metrics["test"], "timings": metrics["timings"]},
    )
    return saved


def _write_artifacts(config: TrainConfig, trained: Trained, summaries, epochs_done: int):
    from job.evaluate import figures
    from job.plots import predictions_panel

    saved = _model_for_users(config, trained)
    # The SavedModel first: at the top of the model dir (Vertex AI's layout),
    # it replaces the whole dir.
    artifacts.export_saved_model(saved, config.saved_model_path)
    artifacts.save_keras_model(saved, config.model_path)

    images, labels = trained.test_images, trained.test_labels
    probabilities = trained.evaluation.probabilities
    if config.num_images:
        rng = np.random.default_rng(config.seed)
        count = min(config.num_images, len(images))
        picks = rng.choice(len(images), count, replace=False)
        predicted = probabilities[picks].argmax(axis=1)
        png = predictions_panel(images[picks], labels[picks], predicted)
        artifacts.write_bytes(config.output_dir / "predictions.png", png)
        summaries.image("predictions", png, step=epochs_done)

    # From the final evaluation's probabilities: no second pass over the test set.
    for name, png in figures(images, labels, probabilities).items():
        artifacts.write_bytes(config.output_dir / f"{name}.png", png)
        summaries.image(name, png, step=epochs_done)
    return saved


def _model_for_users(config: TrainConfig, trained: Trained):
    """A plain copy of the trained model: the training model's variables may be
    distributed, and the saved one should load anywhere, compiled as the seed
    compiled it, with the optimizer's state, so that fine-tuning the loaded
    model continues Adam where training left it."""
    from job.model import build_model, compile_for_users

    saved = build_model(config.hidden_units)
    saved.set_weights(trained.model.get_weights())
    compile_for_users(saved, config.learning_rate)
    saved.optimizer.build(saved.trainable_variables)
    for target, source in zip(saved.optimizer.variables, trained.optimizer.variables, strict=True):
        target.assign(source)
    return saved
