"""Writing results so that a crash never leaves a half-written file that looks
complete: everything goes to a temporary name beside its target and is renamed
into place (rename is atomic within a filesystem)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


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


def ensure_writable_dir(path: Path, what: str) -> None:
    """Fail early, before any training, if `path` cannot take our files."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {path} is not writable: {err.strerror or err}") from None
