"""`run(config)`: one training job from data to artifacts.

Tests and other programs call `run` directly and may inject the data and the
strategy (`datasets=`, `strategy=`), as tensorflow/models' runners do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from job import artifacts, checkpoint, collector, compile_cache, logs
from job.config import TrainConfig
from job.errors import ConfigError, Diverged, JobError, OutOfMemory, Terminated, WorkerLost
from job.logs import Progress
from job.strategy import Cluster, resolve_cluster, setup

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict  # what metrics.json holds (every worker has it, only the chief writes it)
    model: object  # the trained keras.Model


def run(config: TrainConfig, datasets=None, strategy=None) -> RunResult:
    """Train, evaluate and (on the chief) write every artifact.

    `datasets`: a `job.data.Mnist`-like object (uint8 x_train, y_train, x_test,
    y_test) to use instead of the MNIST cache. `strategy`: a ready
    tf.distribute.Strategy to use instead of the one `config.strategy` names.
    """
    started = time.perf_counter()
    cluster = resolve_cluster(config)
    with (
        _sigterm() as sigterm,
        collector.paused() as startup_done,
        _task_fields(cluster),
    ):
        try:
            return _run(config, cluster, datasets, strategy, sigterm, started, startup_done)
        except Exception as err:
            explained = _explain(err)
            if explained is None:
                raise
            raise explained from err


# A full or read-only volume: retrying on the same volume cannot help.
_VOLUME_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _explain(err: Exception) -> JobError | None:
    """One line for a failure of the machine rather than of the code, where a
    traceback would only bury the cause; None for anything else."""
    tf = sys.modules.get("tensorflow")  # not imported yet: not TensorFlow's error
    tf_exhausted = tf is not None and isinstance(err, tf.errors.ResourceExhaustedError)
    if tf_exhausted:
        # TensorFlow's own file writes (the SavedModel's) report a full disk so too.
        for code in _VOLUME_ERRORS:
            if os.strerror(code) in str(err):
                return _volume_error(os.strerror(code), " (TensorFlow writing a file)")
    if isinstance(err, MemoryError) or tf_exhausted:
        # TensorFlow's message is a page of kernel and device names; the shape is the news.
        shape = re.search(r"OOM when allocating tensor with shape\[[^\]]*\]", str(err))
        return OutOfMemory(
            f"out of memory ({shape.group(0) if shape else type(err).__name__}): "
            "lower --hidden-units or --batch-size, or give the job more memory"
        )
    if isinstance(err, OSError) and err.errno in _VOLUME_ERRORS:
        return _volume_error(err.strerror, f" writing {err.filename}" if err.filename else "")
    return None


def _volume_error(reason: str, where: str) -> ConfigError:
    # Every file is written beside its target and renamed into place, so a
    # failed write leaves the previous checkpoint and artifacts as they were.
    return ConfigError(
        f"{reason}{where}: the checkpoints and files written before are intact; "
        "make room (or make the volume writable) and rerun the same command to resume"
    )


def _run(
    config: TrainConfig,
    cluster: Cluster,
    datasets,
    strategy,
    sigterm: _Sigterm,
    started: float,
    startup_done,
) -> RunResult:
    is_chief = cluster.is_chief
    # Every worker decides this before the chief deletes anything.
    replaces_finished_run = config.overwrite and config.metrics_path.exists()
    if is_chief:
        _check_output_dirs(config)
    # Several workers' steps are not XLA-compiled.
    uses_cache = config.compile_cache is not None and not cluster.is_multi_worker
    with compile_cache.binding(enabled=uses_cache):
        placement = _set_up(config, cluster, strategy)
    import keras
    import tensorflow as tf

    from job.loop import NotFinite, Trainer
    from job.model import build_model, build_optimizer
    from job.summaries import Summaries

    keras.utils.set_random_seed(config.seed)
    _log_placement(placement, config)

    data_started = time.perf_counter()
    train, test, test_arrays = _load_splits(config, datasets, tf)
    data_seconds = time.perf_counter() - data_started
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
        single_process=not placement.cluster.is_multi_worker,
    )
    if replaces_finished_run and is_chief:
        # Only now: an option, the device or the data that fails its check
        # must leave the finished run as it was.
        _discard_finished_run(config)
    state = _restore(
        config, model, optimizer, steps_per_epoch, train.size, fresh=replaces_finished_run
    )
    if placement.cluster.is_multi_worker:
        _check_workers_agree(placement.strategy, state.global_step, tf)
    start_step = state.global_step
    resumed_from = {"epoch": state.epoch, "step": state.step} if start_step else None

    summaries = Summaries(config.tensorboard_path if is_chief else None)
    summaries.graph(model)
    events = _TrainingEvents(config, model, optimizer, summaries, steps_per_epoch, is_chief)
    events.progress.update(state.epoch, state.step)

    startup_done()  # the collector runs again during training, over new objects only
    sigterm.catch()  # from here on, SIGTERM means: checkpoint, then stop
    # Its key knows the CPU, not the GPU: GPU runs compile every time.
    cache_dir = config.compile_cache if placement.compiles_with_xla and not placement.gpus else None
    fit_started = time.perf_counter()
    try:
        with compile_cache.offered(cache_dir, config.deterministic):
            finished = trainer.fit(
                train,
                test,
                state,
                epochs=config.epochs,
                seed=config.seed,
                checkpoint_every=config.checkpoint_every,
                on_checkpoint=events.checkpoint,
                on_epoch_end=events.epoch_end,
                stop_requested=sigterm.received,
                on_chunk_end=events.chunk_end,
            )
    except NotFinite as err:
        summaries.close()
        raise Diverged(
            f"training diverged: {err} (nothing from then on was saved). Lower "
            f"--learning-rate (now {config.learning_rate:g}) and pass --overwrite to start over"
        ) from None
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as err:
        if not placement.cluster.is_multi_worker:
            raise
        summaries.close()  # what the chief logged so far stays readable
        # A peer killed (OOM, SIGKILL) or hung: TensorFlow aborts the collective
        # within seconds (heartbeats) with a page of gRPC detail; one line is enough.
        raise WorkerLost(
            f"lost contact with another worker at epoch {state.epoch + 1}, step {state.step} "
            f"({_abort_reason(err)}); rerun every worker to resume from the last checkpoint "
            f"in {config.checkpoint_path.parent}"
        ) from err
    fit_seconds = time.perf_counter() - fit_started
    if not finished:
        summaries.close()
        raise Terminated(
            f"stopped by SIGTERM at epoch {state.epoch + 1}, step {state.step}: "
            f"checkpoint saved in {config.checkpoint_path.parent}; rerun the same command to resume"
        )

    evaluate_started = time.perf_counter()
    final = trainer.evaluate(test)
    evaluate_seconds = time.perf_counter() - evaluate_started
    log.info(
        "test loss %.4f, test accuracy %.4f",
        final.loss,
        final.accuracy,
        extra={"event": "test", "loss": final.loss, "accuracy": final.accuracy},
    )

    timings = {
        "data_seconds": data_seconds,
        "fit_seconds": fit_seconds,
        "evaluate_seconds": evaluate_seconds,
    }
    metrics = _metrics(config, placement, state, final, start_step, resumed_from, timings)
    if is_chief:
        _publish(config, model, optimizer, test_arrays, final, summaries, metrics, started)
    summaries.close()
    return RunResult(metrics, model)


def _metrics(config, placement, state, final, start_step, resumed_from, timings) -> dict:
    """What metrics.json records about the run."""
    import keras
    import tensorflow as tf

    steps_per_epoch = state.steps_per_epoch
    trained_images = (config.epochs * steps_per_epoch - start_step) * config.batch_size
    return {
        "config": config.to_dict(),
        "history": state.history,
        "test": {"loss": final.loss, "accuracy": final.accuracy},
        "resumed_from": resumed_from,
        "timings": timings,
        # None when a resumed run had nothing left to train.
        "throughput": {
            "train_images_per_second": (
                trained_images / timings["fit_seconds"] if trained_images else None
            )
        },
        "versions": _versions(tf, keras),
        "devices": {
            "strategy": placement.strategy_name,
            "replicas": placement.num_replicas,
            "workers": max(1, placement.cluster.num_workers),
            "gpus": placement.gpus,
            "cpu_threads": placement.cpu_threads,
        },
        "train_images": state.fingerprint["train_size"],
    }


def _publish(config, model, optimizer, test_arrays, final, summaries, metrics, started) -> None:
    """The chief's last act: every artifact, then metrics.json."""
    artifacts_started = time.perf_counter()
    epochs_done = len(metrics["history"])
    _write_artifacts(config, model, optimizer, test_arrays, final, summaries, epochs_done)
    metrics["timings"]["artifacts_seconds"] = time.perf_counter() - artifacts_started
    metrics["timings"]["total_seconds"] = time.perf_counter() - started
    summaries.hparams(
        {**metrics["config"], **metrics["devices"], "train_images": metrics["train_images"]},
        metrics["test"],
        step=epochs_done,
    )
    # Last, so that its presence means the run finished.
    artifacts.write_json(config.metrics_path, metrics)
    log.info(
        "Wrote model, logs, predictions and metrics to %s",
        config.output_dir,
        extra={"event": "end", "test": metrics["test"], "timings": metrics["timings"]},
    )


def _set_up(config: TrainConfig, cluster, strategy):
    """Devices, threads and the strategy; checks the batch splits across replicas."""
    placement = setup(config, cluster, strategy)
    # MultiWorkerMirroredStrategy's runtime installs its own SIGTERM handler
    # (preemption notices), which swallows the signal before Python sees it.
    # Put Python's back, so SIGTERM still ends set-up now and training later.
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
    if config.batch_size % placement.num_replicas:
        raise ConfigError(
            f"--batch-size {config.batch_size} (global) must divide evenly "
            f"across {placement.num_replicas} replicas"
        )
    return placement


class _TrainingEvents:
    """What happens between compiled chunks of steps: checkpoints (chief only),
    a log line and TensorBoard scalars per epoch, and the progress line."""

    def __init__(self, config, model, optimizer, summaries, steps_per_epoch: int, is_chief: bool):
        self.config, self.model, self.optimizer = config, model, optimizer
        self.summaries, self.is_chief = summaries, is_chief
        self.progress = Progress(log, config.epochs, steps_per_epoch, config.batch_size)

    def checkpoint(self, state: checkpoint.TrainState) -> None:
        if self.is_chief:
            optimizer_values = [v.numpy() for v in self.optimizer.variables]
            checkpoint.save(
                self.config.checkpoint_path, self.model.get_weights(), optimizer_values, state
            )

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
        self.progress.update(state.epoch, 0)

    def chunk_end(self, state: checkpoint.TrainState, mean_loss: float) -> None:
        self.summaries.chunk(state.global_step, mean_loss)
        self.progress.update(state.epoch, state.step)


def _abort_reason(err) -> str:
    """The line of a collective's abort message that says why."""
    for line in err.message.splitlines():
        if "aborted by:" in line:
            return line.split("aborted by:", 1)[1].strip().rstrip(":")
    return type(err).__name__


class _InMemory:
    """A split as device tensors: uint8 images, int32 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, tf):
        self.size = len(images)
        self.images = tf.constant(images, dtype=tf.uint8)
        self.labels = tf.constant(labels[: self.size], dtype=tf.int32)


def _load_splits(config: TrainConfig, datasets, tf):
    """(train, test) as tensors, and the test set as numpy arrays for the figures.

    The numpy training images are dropped on return (47 MB that would
    otherwise stay alive next to their tensor copy for the whole run).
    """
    from job.data import load

    mnist = datasets if datasets is not None else load(config.data_dir)
    train = _InMemory(mnist.x_train[: config.max_train_samples], mnist.y_train, tf)
    test = _InMemory(mnist.x_test, mnist.y_test, tf)
    return train, test, (mnist.x_test, mnist.y_test)


def _check_output_dirs(config: TrainConfig) -> None:
    """Fail before any training if a dir we write cannot take files, or if the
    output dir holds a finished run that is not to be replaced."""
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
    if config.metrics_path.exists() and not config.overwrite:
        raise ConfigError(
            f"{config.output_dir} holds a finished run (metrics.json): "
            "pass --overwrite to replace it, or choose another --output-dir"
        )


def _discard_finished_run(config: TrainConfig) -> None:
    log.warning("--overwrite: replacing the finished run in %s", config.output_dir)
    # The metrics go first, so an interrupted overwrite never looks finished;
    # then the old model, which predict and evaluate would otherwise still use
    # beside the new run's checkpoint.
    config.metrics_path.unlink(missing_ok=True)
    config.model_path.unlink(missing_ok=True)
    shutil.rmtree(config.saved_model_path, ignore_errors=True)
    _discard_training_state(config)


def _discard_training_state(config: TrainConfig) -> None:
    """Forget a run's checkpoint and logs, which would otherwise be resumed
    from or mixed into the new run's."""
    shutil.rmtree(config.checkpoint_path.parent, ignore_errors=True)
    shutil.rmtree(config.tensorboard_path, ignore_errors=True)


def _fingerprint(config: TrainConfig, train_size: int) -> dict:
    """What a checkpoint depends on: resuming with other values would be wrong."""
    return {
        "hidden_units": list(config.hidden_units),
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "train_size": train_size,
    }


def _restore(config, model, optimizer, steps_per_epoch: int, train_size: int, fresh: bool):
    """The state to train from: the checkpoint's, loaded into the model and the
    optimizer, or a new one (`fresh`, no checkpoint, or --overwrite of one that
    cannot be resumed)."""
    fingerprint = _fingerprint(config, train_size)
    try:
        saved = None if fresh else checkpoint.load(config.checkpoint_path)
        if saved is None:
            return checkpoint.TrainState(steps_per_epoch=steps_per_epoch, fingerprint=fingerprint)
        weights, optimizer_values, state = saved
        checkpoint.check_compatible(state, fingerprint, config.checkpoint_path)
        checkpoint.check_fits(
            weights, model.weights, optimizer_values, optimizer.variables, config.checkpoint_path
        )
        if state.global_step > config.epochs * steps_per_epoch:
            raise ConfigError(
                f"checkpoint {config.checkpoint_path} is past --epochs {config.epochs} (at "
                f"epoch {state.epoch + 1}, step {state.step}): pass --epochs "
                f"{state.epoch + (1 if state.step else 0)} or more to resume it, "
                "or --overwrite to start over"
            )
    except ConfigError as err:  # corrupt, of other settings, or past --epochs
        if not config.overwrite:
            raise
        # --overwrite starts over from a corrupt checkpoint or one of other
        # settings, but a compatible one is still resumed: a preempted pod whose
        # spec says --overwrite must not throw away its progress on every restart.
        log.warning("--overwrite: starting over (%s)", err)
        _discard_training_state(config)
        return checkpoint.TrainState(steps_per_epoch=steps_per_epoch, fingerprint=fingerprint)
    model.set_weights(weights)
    for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
        variable.assign(value)
    log.info(
        "Resuming from %s: epoch %d, step %d (global step %d)",
        config.checkpoint_path,
        state.epoch + 1,
        state.step,
        state.global_step,
    )
    return state


def _check_workers_agree(strategy, global_step: int, tf) -> None:
    """Every worker must resume from the same checkpoint: they all read the
    chief's, so the output dir must be one volume shared by all workers."""

    @tf.function
    def total_step():
        return strategy.reduce(
            "SUM", strategy.run(lambda: tf.constant(global_step, tf.int64)), axis=None
        )

    if int(total_step()) != global_step * strategy.num_replicas_in_sync:
        raise ConfigError(
            f"workers disagree on where to resume (this one: step {global_step}); "
            "all workers must mount the same output dir"
        )


def _write_artifacts(
    config, model, optimizer, test_arrays, final, summaries, epochs_done: int
) -> None:
    from job.evaluate import figures
    from job.model import build_model, compile_for_users
    from job.plots import predictions_panel

    # Save a plain copy: the training model's variables may be distributed, and
    # the saved one should load anywhere, compiled as the seed compiled it.
    saved = build_model(config.hidden_units)
    saved.set_weights(model.get_weights())
    compile_for_users(saved, config.learning_rate)
    # With the optimizer's state too, so that fine-tuning the loaded model
    # continues Adam where training left it.
    saved.optimizer.build(saved.trainable_variables)
    for target, source in zip(saved.optimizer.variables, optimizer.variables, strict=True):
        target.assign(source)
    artifacts.save_keras_model(saved, config.model_path)
    artifacts.export_saved_model(saved, config.saved_model_path)

    test_images, test_labels = test_arrays
    if config.num_images:
        rng = np.random.default_rng(config.seed)
        count = min(config.num_images, len(test_images))
        picks = rng.choice(len(test_images), count, replace=False)
        predicted = final.probabilities[picks].argmax(axis=1)
        png = predictions_panel(test_images[picks], test_labels[picks], predicted)
        artifacts.write_bytes(config.output_dir / "predictions.png", png)
        summaries.image("predictions", png, step=epochs_done)

    # From the final evaluation's probabilities: no second pass over the test set.
    for name, png in figures(test_images, test_labels, final.probabilities).items():
        artifacts.write_bytes(config.output_dir / f"{name}.png", png)
        summaries.image(name, png, step=epochs_done)


def _versions(tf, keras) -> dict:
    import job

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "mnist_job": job.__version__,
    }


def _log_placement(placement, config: TrainConfig) -> None:
    log.info(
        "Strategy %s: %d replica(s) on %s; global batch %d = %d per replica; %d CPU threads",
        placement.strategy_name,
        placement.num_replicas,
        ", ".join(placement.gpus) or "CPU",
        config.batch_size,
        config.batch_size // placement.num_replicas,
        placement.cpu_threads,
        extra={
            "event": "start",
            "strategy": placement.strategy_name,
            "replicas": placement.num_replicas,
            "gpus": placement.gpus,
            "cpu_threads": placement.cpu_threads,
            "config": config.to_dict(),
        },
    )


def _task_fields(cluster: Cluster):
    """In a multi-worker run, every log record names its worker's task (JSON lines
    get `task_type` and `task_index`, as in TF_CONFIG)."""
    if not cluster.is_multi_worker:
        return contextlib.nullcontext()
    return logs.fields(task_type=cluster.task_type, task_index=cluster.task_index)


class _Sigterm:
    """What SIGTERM (Kubernetes eviction, docker stop) does during a run.

    Until `catch()` it ends the process at once: set-up (importing TensorFlow,
    fetching MNIST) has nothing to lose and need not finish first. From then on
    it only sets a flag: training checkpoints at the end of the current chunk
    and stops with exit 143; once training is done the run finishes writing its
    artifacts, which takes about a second, rather than leave them half made.
    """

    def __init__(self):
        self._received = False

    def catch(self) -> None:
        signal.signal(signal.SIGTERM, self._receive)

    def received(self) -> bool:
        return self._received

    def _receive(self, signum, frame) -> None:
        self._received = True


@contextlib.contextmanager
def _sigterm() -> Iterator[_Sigterm]:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield _Sigterm()
    finally:
        signal.signal(signal.SIGTERM, previous)
