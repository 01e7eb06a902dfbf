"""Writing results so that a crash never leaves a half-written file that looks
complete: everything goes to a temporary name beside its target and is renamed
into place (rename is atomic within a filesystem). A temporary's name holds
its writer's host and process id, so that the next write of the target clears
what a killed writer left and nothing a live one is still writing."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
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
    owner = f"{socket.gethostname()}.{os.getpid()}"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner}.", dir=target.parent))
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
    # Temporaries of earlier writes of this target that a kill interrupted;
    # never one that a live process may still be writing.
    for other in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if _abandoned(other, other.name[len(target.name) + 2 :]):
            shutil.rmtree(other, ignore_errors=True)
    _fsync_dir(target.parent)


# A write takes seconds at most: a temporary this old whose writer we cannot
# check (another host's, or of an older version) was abandoned.
ABANDONED_AFTER_SECONDS = 3600


def _abandoned(tmp: Path, owner: str) -> bool:
    """Whether the temporary `tmp`, named for `owner` (`<host>.<pid>.<random>`),
    was left by a writer that is gone: a process of this host that no longer
    runs, or anyone, an hour ago."""
    host, pid, _ = [*owner.rsplit(".", 2), "", ""][:3]
    if host == socket.gethostname() and pid.isdigit():
        return not process_running(int(pid))
    try:
        return time.time() - tmp.lstat().st_mtime > ABANDONED_AFTER_SECONDS
    except OSError:
        return False


def process_running(pid: int) -> bool:
    """Whether a process of this host has id `pid` (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


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
    """Strict JSON: a NaN or an infinity is a ValueError, never bare `NaN`."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    write_bytes(target, (text + "\n").encode())


def save_keras_model(model, target: Path) -> None:
    with atomic_path(target) as tmp:
        model.save(tmp)


def export_saved_model(model, target: Path) -> None:
    """TF Serving format; the `serve` signature maps a float32 batch of 28x28
    images in [0, 1] to class probabilities."""
    with atomic_path(target) as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)


def unwritable_reason(path: Path, create: bool = True) -> str | None:
    """Why directory `path` cannot take our files, or None: tries a temporary
    file in it. `create`: make `path` first if missing; otherwise try its
    nearest existing parent and leave nothing behind."""
    path = Path(path)
    probe = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                return f"{probe} is not a directory"
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        reason = str(err.strerror or err)
        return reason if probe == path else f"{probe}: {reason}"
    return None


def ensure_writable_dir(path: Path, what: str) -> None:
    """Fail early, before any training, if `path` cannot take our files."""
    reason = unwritable_reason(path)
    if reason:
        raise ConfigError(f"{what} {path} is not writable: {reason}")
