"""Writing results so that a crash never leaves a half-written file that looks
complete: everything goes to a temporary name beside its target and is renamed
into place (rename is atomic within a filesystem)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from job.errors import ConfigError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success.

    The temporary keeps the target's suffix, since some writers (Keras) check it.
    Works for files and directories.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        _fsync(tmp)
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: move the old
            # one aside first, so that the target is never missing for long.
            old = tmp_dir / "old"
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    # Temporaries of earlier writes of this target that a kill interrupted.
    # Only one process writes a target, except compile cache entries, whose
    # writers all write the same bytes: one whose temporary goes here fails its
    # rename, and the entry is there all the same.
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(target.parent)


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename in `path` (not every filesystem supports this)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path, obj: dict) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_keras_model(model, target: Path) -> None:
    with atomic_path(target) as tmp:
        model.save(tmp)


def export_saved_model(model, target: Path) -> None:
    """TF Serving format; the `serve` signature maps a float32 batch of 28x28
    images in [0, 1] to class probabilities."""
    with atomic_path(target) as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)


def unwritable_reason(path: Path) -> str | None:
    """Why directory `path` (created if missing) cannot take our files, or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return str(err.strerror or err)
    return None


def ensure_writable_dir(path: Path, what: str) -> None:
    """Fail early, before any training, if `path` cannot take our files."""
    reason = unwritable_reason(path)
    if reason:
        raise ConfigError(f"{what} {path} is not writable: {reason}")


def model_file(path: Path) -> Path:
    """A model.keras path, or an output dir holding one -> the model.keras path."""
    path = Path(path)
    return path / "model.keras" if path.is_dir() else path


def load_model(path: Path):
    """Load a model that `mnist-job train` saved (`path`: the file or its dir).

    ConfigError (exit 2) if there is none or it is not a 28x28 -> 10 digits
    Keras model. Checks the path before importing TensorFlow, so that a wrong
    path fails at once.
    """
    target = model_file(path)
    if not target.is_file():
        raise ConfigError(
            f"no model at {target}: pass --model a model.keras file or an output dir "
            "of `mnist-job train`"
        )
    if target.suffix == ".keras" and not zipfile.is_zipfile(target):
        # Keras would say "File not found" of a file that is right there.
        raise ConfigError(
            f"cannot load model {target}: not a complete .keras file (truncated or corrupt); "
            "train again, or copy it again from where it was written"
        )
    import keras

    from job.data import IMAGE_SHAPE, NUM_CLASSES

    try:
        model = keras.saving.load_model(target, compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load model {target}: {reason}") from None
    if tuple(model.input_shape[1:]) != IMAGE_SHAPE or model.output_shape[-1] != NUM_CLASSES:
        raise ConfigError(
            f"model {target} maps {model.input_shape[1:]} to {model.output_shape[-1]} classes, "
            f"not {IMAGE_SHAPE} images to {NUM_CLASSES} digits"
        )
    return model
