"""Training state on disk, so a preempted or crashed run resumes where it was.

One file, `latest.npz`: model weights, optimizer slots and a small JSON of
counters and history, replaced atomically. It is small (about 1.3 MB for the
seed's model), so writing all of it every time is simpler than anything
incremental, and a crash mid-write leaves the previous checkpoint intact.

A checkpoint records the settings it depends on (`fingerprint`); `restore`
resumes only a checkpoint whose fingerprint and arrays fit the run.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from job.artifacts import atomic_path
from job.config import TrainConfig
from job.errors import ConfigError, JobError

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that, with the weights, define where training stands."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed within the current epoch
    steps_per_epoch: int = 0
    loss_sum: float = 0.0  # running sums for the current epoch's metrics
    correct: float = 0.0
    seconds: float = 0.0  # spent on the current epoch's steps, across resumes
    history: list[dict] = field(default_factory=list)  # one dict per completed epoch
    fingerprint: dict = field(default_factory=dict)  # settings that must not change
    mlflow_run_id: str | None = None  # the MLflow run recording this training (job/tracking.py)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


# A history record's keys (loop.epoch_record); metrics.json copies the records as they are.
RECORD_KEYS = frozenset(
    ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second")
)


def save(path: Path, weights: list, optimizer_variables: list, state: TrainState) -> None:
    arrays = {f"weight_{i}": np.asarray(w) for i, w in enumerate(weights)}
    arrays |= {f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer_variables)}
    arrays["state"] = np.array(json.dumps(asdict(state)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load(path: Path) -> tuple[list, list, TrainState] | None:
    """The checkpoint at `path`, or None if there is none.

    A corrupt one (a directory or a symlink loop too) is a ConfigError (exit 2:
    a retry would read the same bytes), which --overwrite turns into a fresh
    start; a failed read (an I/O error on a network volume) is a JobError
    (exit 1: worth a retry).
    """
    try:
        with open(path, "rb") as f:  # an I/O error stays one (below), unlike in is_zipfile
            if f.read(4) != b"PK\x03\x04":  # np.load would try anything else as a pickle
                raise ValueError("not an .npz archive")
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                state = TrainState(**json.loads(str(npz["state"])))
                weights = _numbered(npz, "weight_")
                optimizer_variables = _numbered(npz, "optimizer_")
        _check_state(state)
    except (FileNotFoundError, NotADirectoryError):  # as Path.exists() says: none
        return None
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _corrupt(path, err) from None
    except OSError as err:
        if isinstance(err, IsADirectoryError) or err.errno == errno.ELOOP:
            raise _corrupt(path, err.strerror) from None
        raise JobError(f"checkpoint {path} could not be read ({err})") from None
    return weights, optimizer_variables, state


def _check_state(state: TrainState) -> None:
    """Refuse what would crash the loop or reach metrics.json as anything but
    finite numbers (NaN is not JSON)."""
    counters = (state.epoch, state.step, state.steps_per_epoch)
    whole = all(type(n) is int and n >= 0 for n in counters)
    if not whole or state.steps_per_epoch == 0 or state.step > state.steps_per_epoch:
        raise ValueError(
            f"bad counters: epoch {state.epoch!r}, step {state.step!r} of {state.steps_per_epoch!r}"
        )
    sums = (state.loss_sum, state.correct, state.seconds)
    if not all(_finite(x) and x >= 0 for x in sums):
        raise ValueError(f"bad running sums: {sums!r}")
    if not isinstance(state.fingerprint, dict):
        raise ValueError("bad fingerprint")
    if not isinstance(state.mlflow_run_id, str | None):
        raise ValueError(f"bad MLflow run id: {state.mlflow_run_id!r:.100}")
    if not isinstance(state.history, list) or len(state.history) != state.epoch:
        raise ValueError(f"bad history: not one record for each of {state.epoch} epochs")
    for epoch, record in enumerate(state.history, 1):
        if not (
            isinstance(record, dict)
            and set(record) == RECORD_KEYS
            and all(_finite(value) for value in record.values())
            and type(record["epoch"]) is int
            and record["epoch"] == epoch
        ):
            raise ValueError(f"bad history record for epoch {epoch}: {record!r:.100}")


def _finite(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def check_fits(weights, model_weights, optimizer_values, optimizer_variables, path: Path) -> None:
    """Refuse, before assigning any of them, arrays that do not fit the model or
    the optimizer: a half-loaded model must never be trained on."""
    for what, saved, variables in (
        ("weight", weights, model_weights),
        ("optimizer", optimizer_values, optimizer_variables),
    ):
        if len(saved) != len(variables):
            raise _corrupt(path, f"{len(saved)} {what} arrays, the model has {len(variables)}")
        for i, (array, variable) in enumerate(zip(saved, variables, strict=True)):
            array, shape = np.asarray(array), tuple(variable.shape)
            dtype = getattr(variable.dtype, "name", variable.dtype)  # Keras: a str; TF: a DType
            if array.shape != shape:
                raise _corrupt(path, f"{what} {i} has shape {array.shape}, the model's {shape}")
            if array.dtype.name != dtype:
                raise _corrupt(path, f"{what} {i} has dtype {array.dtype}, the model's {dtype}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise _corrupt(path, f"{what} {i} is not finite")


def _corrupt(path: Path, reason) -> ConfigError:
    # Exit 2: a retry would read the same bytes; --overwrite turns it into a fresh start.
    return ConfigError(
        f"checkpoint {path} is corrupt ({reason}); delete it, or pass --overwrite to start over"
    )


def _numbered(npz, prefix: str) -> list:
    count = sum(1 for key in npz.files if key.startswith(prefix))
    return [npz[f"{prefix}{i}"] for i in range(count)]


def check_compatible(saved: TrainState, fingerprint: dict, path: Path) -> None:
    """Refuse to resume with settings that change the model or the data order."""
    changed = [
        f"{key} {saved.fingerprint.get(key)!r} -> {value!r}"
        for key, value in fingerprint.items()
        if saved.fingerprint.get(key) != value
    ]
    if changed:
        raise ConfigError(
            f"checkpoint {path} was written with other settings ({'; '.join(changed)}): "
            "rerun with the original settings, or pass --overwrite to start over"
        )


def fingerprint(config: TrainConfig, train_size: int) -> dict:
    """What a checkpoint depends on: resuming with other values would be wrong."""
    return {
        "hidden_units": list(config.hidden_units),
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "train_size": train_size,
    }


def restore(
    config: TrainConfig,
    model,
    optimizer,
    steps_per_epoch: int,
    train_size: int,
    fresh: bool,
    discard: Callable[[], None] | None = None,
    shown: Callable[[Path], str] = str,
) -> TrainState:
    """The state to train from: the checkpoint's, loaded into the model and the
    optimizer, or a new one (`fresh`, no checkpoint, or --overwrite of one that
    cannot be resumed). `discard`: forgets the training state (by default
    discard_training_state); `shown`: where a path is, for the log."""
    expected = fingerprint(config, train_size)
    path = config.checkpoint_path
    try:
        saved = None if fresh else load(path)
        if saved is None:
            return TrainState(steps_per_epoch=steps_per_epoch, fingerprint=expected)
        weights, optimizer_values, state = saved
        check_compatible(state, expected, path)
        if state.steps_per_epoch != steps_per_epoch:  # same batch size and data: same steps
            raise _corrupt(path, f"{state.steps_per_epoch} steps per epoch, not {steps_per_epoch}")
        check_fits(weights, model.weights, optimizer_values, optimizer.variables, path)
        if state.global_step > config.epochs * steps_per_epoch:
            raise ConfigError(
                f"checkpoint {path} is past --epochs {config.epochs} (at "
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
        (discard or (lambda: discard_training_state(config)))()
        return TrainState(steps_per_epoch=steps_per_epoch, fingerprint=expected)
    model.set_weights(weights)
    for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
        variable.assign(value)
    log.info(
        "Resuming from %s: epoch %d, step %d (global step %d)",
        shown(path),
        state.epoch + 1,
        state.step,
        state.global_step,
    )
    return state


def discard_training_state(config: TrainConfig) -> None:
    """Forget a run's checkpoint and logs, which would otherwise be resumed
    from or mixed into the new run's."""
    shutil.rmtree(config.checkpoint_path.parent, ignore_errors=True)
    shutil.rmtree(config.tensorboard_path, ignore_errors=True)


def check_workers_agree(strategy, global_step: int) -> None:
    """Every worker must resume from the same checkpoint: they all read the
    chief's, so the output dir must be one volume shared by all workers."""
    import tensorflow as tf

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
