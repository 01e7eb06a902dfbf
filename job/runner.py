"""`run(config)`: one training job, read top-down as prepare, train, finish.

Tests and other programs call `run` directly and may inject the data and the
strategy (`datasets=`, `strategy=`), as tensorflow/models' runners do.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from job import checkpoint, collector, compile_cache, errors, logs, outputs, sigterm, trainer_status
from job.config import TrainConfig
from job.errors import ConfigError, Diverged, Terminated, WorkerLost
from job.logs import Progress
from job.mirror import Mirror
from job.strategy import Cluster, Placement, log_placement, resolve_cluster, setup
from job.tracking import tracked

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict  # what metrics.json holds (every worker has it, only the chief writes it)
    model: object  # the trained keras.Model
    workers: int  # processes that trained together: 1 when this one trained alone


def run(config: TrainConfig, datasets=None, strategy=None) -> RunResult:
    """Train, evaluate and (on the chief) write every artifact.

    `datasets`: a `job.data.Mnist`-like object (uint8 x_train, y_train, x_test,
    y_test) to use instead of the MNIST cache. `strategy`: a ready
    tf.distribute.Strategy to use instead of the one `config.strategy` names.
    """
    started = time.perf_counter()
    cluster = resolve_cluster(config)
    # Bucket outputs are written to a staging dir, then uploaded (job/mirror.py).
    mirror = Mirror(config, task=f"{cluster.task_type}-{cluster.task_index}")
    with (
        errors.explained(),
        sigterm.handled() as termination,
        collector.paused() as startup_done,
        logs.task_fields(cluster),
        outputs.claimed(mirror.local, cluster.is_chief, mirror),
    ):
        # Not in _prepare: TensorFlow's import leaves a cycle (tf.lite's loader keeps an
        # ImportError) holding the importing frames, frozen with their locals (job/collector.py).
        import tensorflow  # noqa: F401

        job = _prepare(mirror.local, cluster, datasets, strategy, mirror)
        from job.summaries import Summaries

        log_dir = job.config.tensorboard_path if cluster.is_chief else None
        with (
            contextlib.closing(Summaries(log_dir)) as summaries,
            tracked(job.config, job.state, job.placement) as job.tracker,
        ):
            summaries.graph(job.trainer.model)
            startup_done()  # the collector runs again during training, over new objects only
            termination.catch()  # from here on, SIGTERM means: checkpoint, then stop
            _train(job, summaries, termination)
            result = _finish(job, summaries, started)
    # The bucket holds the finished run: its staged copy is no longer needed.
    mirror.discard_staging()
    return result


@dataclass
class _Job:
    """What the steps of one run share: made by _prepare, used by _train and _finish."""

    config: TrainConfig  # local paths only: bucket dirs replaced by staging dirs
    mirror: Mirror  # uploads what the chief writes to the bucket dirs, if any
    placement: Placement
    trainer: object  # job.loop.Trainer, holding the model and its optimizer
    train: _InMemory | None  # None once trained: writing the artifacts needs only the test set
    test: _InMemory
    test_arrays: tuple[np.ndarray, np.ndarray]  # the test set as numpy, for the figures
    state: checkpoint.TrainState  # where training stands; updated in place
    resumed_from: dict | None  # the checkpoint's {"epoch", "step"}, None if a fresh start
    timings: dict  # seconds per phase, as metrics.json records them
    tracker: object = None  # job.tracking.Tracker (MLflow), set by run()


def _prepare(config: TrainConfig, cluster: Cluster, datasets, strategy, mirror: Mirror) -> _Job:
    """Checks, devices, data, the model and the state to train from. Nothing
    of a finished run is deleted before every check has passed."""
    # Every worker decides this before the chief deletes anything.
    replaces_finished_run = config.overwrite and outputs.finished(config, mirror)
    # Several workers' steps are not XLA-compiled.
    uses_cache = config.compile_cache is not None and not cluster.is_multi_worker
    with compile_cache.binding(enabled=uses_cache):
        placement = _set_up(config, cluster, strategy)
    import keras

    from job.loop import Trainer
    from job.model import build_model, build_optimizer

    keras.utils.set_random_seed(config.seed)
    log_placement(placement, config)

    data_started = time.perf_counter()
    train, test, test_arrays = _load_splits(config, datasets)
    timings = {"data_seconds": time.perf_counter() - data_started}
    steps_per_epoch = train.size // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {train.size} training images"
        )

    with placement.strategy.scope():
        model = build_model(config.hidden_units)
        optimizer = build_optimizer(config.learning_rate)
        optimizer.build(model.trainable_variables)
    trainer = Trainer(
        model,
        optimizer,
        placement.strategy,
        global_batch=config.batch_size,
        jit_compile=placement.compiles_with_xla,
        single_process=not cluster.is_multi_worker,
    )
    if replaces_finished_run and cluster.is_chief:
        # Only now: an option, the device or the data that fails its check
        # must leave the finished run as it was.
        outputs.discard_finished_run(config, mirror)
    if not replaces_finished_run:
        mirror.fetch_checkpoint()
    state = checkpoint.restore(
        config,
        model,
        optimizer,
        steps_per_epoch,
        train.size,
        fresh=replaces_finished_run,
        discard=lambda: outputs.discard_training_state(config, mirror),
        shown=mirror.shown,
    )
    if cluster.is_multi_worker:
        checkpoint.check_workers_agree(placement.strategy, state.global_step)
    resumed_from = {"epoch": state.epoch, "step": state.step} if state.global_step else None
    return _Job(
        config, mirror, placement, trainer, train, test, test_arrays, state, resumed_from, timings
    )


def _train(job: _Job, summaries, termination: sigterm.Sigterm) -> None:
    """Train every epoch left, checkpointing on the way; Terminated if SIGTERM
    stopped it (after a checkpoint), Diverged or WorkerLost if it failed."""
    import tensorflow as tf

    from job.loop import NotFinite
    from job.profiler import StepProfiler

    config, placement, state = job.config, job.placement, job.state
    events = _TrainingEvents(job, summaries)
    events.progress.update(state.epoch, state.step)
    # Its key knows the CPU, not the GPU: GPU runs compile every time.
    cache_dir = config.compile_cache if placement.compiles_with_xla and not placement.gpus else None
    started = time.perf_counter()
    try:
        with (
            compile_cache.offered(cache_dir, config.deterministic),
            StepProfiler(config.profile_steps, events.profile_dir) as profiler,
        ):
            finished = job.trainer.fit(
                job.train,
                job.test,
                state,
                epochs=config.epochs,
                seed=config.seed,
                checkpoint_every=config.checkpoint_every,
                on_checkpoint=events.checkpoint,
                on_epoch_end=events.epoch_end,
                stop_requested=termination.received,
                on_chunk_end=events.chunk_end,
                profiler=profiler,
            )
    except NotFinite as err:
        raise Diverged(
            f"training diverged: {err} (nothing from then on was saved). Lower "
            f"--learning-rate (now {config.learning_rate:g}) and pass --overwrite to start over"
        ) from None
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as err:
        if not placement.cluster.is_multi_worker:
            raise
        # A peer killed (OOM, SIGKILL) or hung: TensorFlow aborts the collective
        # within seconds (heartbeats) with a page of gRPC detail; one line is enough.
        raise WorkerLost(
            f"lost contact with another worker at epoch {state.epoch + 1}, step {state.step} "
            f"({errors.abort_reason(err)}); rerun every worker to resume from the last "
            f"checkpoint in {job.mirror.shown(config.checkpoint_path.parent)}"
        ) from err
    job.timings["fit_seconds"] = time.perf_counter() - started
    job.train = None  # its 47 MB would make writing the artifacts the run's peak memory
    if not finished:
        raise Terminated(
            f"stopped by SIGTERM at epoch {state.epoch + 1}, step {state.step}: checkpoint "
            f"saved in {job.mirror.shown(config.checkpoint_path.parent)}; rerun the same "
            "command to resume"
        )


def _finish(job: _Job, summaries, started: float) -> RunResult:
    """Evaluate on the test set; the chief writes every artifact, metrics.json last."""
    evaluate_started = time.perf_counter()
    evaluation = job.trainer.evaluate(job.test)
    job.timings["evaluate_seconds"] = time.perf_counter() - evaluate_started
    log.info(
        "test loss %.4f, test accuracy %.4f",
        evaluation.loss,
        evaluation.accuracy,
        extra={"event": "test", "loss": evaluation.loss, "accuracy": evaluation.accuracy},
    )
    metrics = outputs.metrics(
        job.mirror.config, job.placement, job.state, evaluation, job.resumed_from, job.timings
    )
    model = job.trainer.model
    if job.placement.is_chief:
        trained = outputs.Trained(model, job.trainer.optimizer, evaluation, *job.test_arrays)
        saved = outputs.publish(job.config, trained, metrics, summaries, started, job.mirror)
        job.tracker.finish(job.config, metrics, saved, trained.test_images)
    return RunResult(metrics, model, workers=metrics["devices"]["workers"])


def _set_up(config: TrainConfig, cluster, strategy):
    """Devices, threads and the strategy; checks the batch splits across replicas."""
    placement = setup(config, cluster, strategy)
    # So that SIGTERM still ends set-up now and stops training later.
    sigterm.reclaim()
    if config.batch_size % placement.num_replicas:
        raise ConfigError(
            f"--batch-size {config.batch_size} (global) must divide evenly "
            f"across {placement.num_replicas} replicas"
        )
    return placement


class _TrainingEvents:
    """What happens between compiled chunks of steps: checkpoints (chief only),
    a log line and TensorBoard scalars per epoch, and the progress line."""

    def __init__(self, job: _Job, summaries):
        self.config, self.summaries, self.mirror = job.config, summaries, job.mirror
        self.model, self.optimizer = job.trainer.model, job.trainer.optimizer
        self.is_chief = job.placement.is_chief
        self.profile_dir = job.config.tensorboard_path / "train" if self.is_chief else None
        # Kubeflow Trainer's progress reports, where it asks for them.
        self.reporter = trainer_status.reporter(job.config.epochs) if self.is_chief else None
        self.tracker = job.tracker
        self.progress = Progress(
            log, job.config.epochs, job.state.steps_per_epoch, job.config.batch_size
        )

    def checkpoint(self, state: checkpoint.TrainState) -> None:
        if self.is_chief:
            optimizer_values = [v.numpy() for v in self.optimizer.variables]
            checkpoint.save(
                self.config.checkpoint_path, self.model.get_weights(), optimizer_values, state
            )
            self.mirror.checkpoint_saved()

    def epoch_end(self, state: checkpoint.TrainState, record: dict) -> None:
        log.info(
            "epoch %d/%d: loss %.4f, accuracy %.4f, val_loss %.4f, val_accuracy %.4f "
            "(%.2f s, %.0f images/s)",
            record["epoch"],
            self.config.epochs,
            record["loss"],
            record["accuracy"],
            record["val_loss"],
            record["val_accuracy"],
            record["seconds"],
            record["images_per_second"],
            extra={"event": "epoch", "epochs": self.config.epochs, **record},
        )
        # .numpy(): under a distribution strategy this is a mirrored variable.
        learning_rate = float(self.optimizer.learning_rate.numpy())
        self.summaries.epoch(record, learning_rate=learning_rate)
        if self.is_chief:
            self.mirror.logs_written()
        if self.reporter:
            self.reporter.epoch_end(record)
        self.tracker.epoch_end(record)
        self.progress.update(state.epoch, 0)

    def chunk_end(self, state: checkpoint.TrainState, mean_loss: float) -> None:
        self.summaries.chunk(state.global_step, mean_loss)
        self.progress.update(state.epoch, state.step)


class _InMemory:
    """A split as device tensors: uint8 images, int32 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import tensorflow as tf

        self.size = len(images)
        self.images = tf.constant(images, dtype=tf.uint8)
        self.labels = tf.constant(labels[: self.size], dtype=tf.int32)


def _load_splits(config: TrainConfig, datasets):
    """(train, test) as tensors, and the test set as numpy arrays for the figures.

    The numpy training images are dropped on return (47 MB that would
    otherwise stay alive next to their tensor copy for the whole run).
    """
    from job.inputs import load_data

    mnist = datasets if datasets is not None else load_data(config.data_dir)
    train = _InMemory(mnist.x_train[: config.max_train_samples], mnist.y_train)
    test = _InMemory(mnist.x_test, mnist.y_test)
    return train, test, (mnist.x_test, mnist.y_test)
