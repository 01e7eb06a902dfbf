"""Every failure the job expects, and the exit code each one ends with.

Kubernetes' podFailurePolicy keys on these codes, so they are part of the
job's interface: change one and you change how clusters treat a failed pod.
The CLI catches JobError in one place and prints its message as one line;
`explain` turns the machine's failures (a full volume, out of memory) into
JobErrors first. Anything else is a bug: a traceback and exit 1.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import sys
from collections.abc import Iterator


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything unexpected: a bug, out of memory; worth a retry
    USAGE = 2  # bad option, bad config, unusable output dir: retrying won't help
    DATA = 3  # MNIST unavailable or corrupt; predict: an input image unreadable
    DEVICE = 4  # the requested device (GPU) is not visible
    INTERRUPTED = 130  # Ctrl-C (128 + 2): rerun resumes from the last checkpoint
    TERMINATED = 143  # SIGTERM (128 + 15): checkpoint written, rerun resumes


EXIT_CODES_HELP = """
\b
Exit codes:
  0    success
  1    unexpected failure (a bug, out of memory, a lost worker): worth a
       retry, which resumes from the last checkpoint
  2    usage or configuration error (bad option or environment, unusable
       output dir or one another run holds, finished run without
       --overwrite, checkpoint corrupt or made with other settings, output
       volume full, read-only or forbidden, loss or weights diverged to
       NaN): fix the command or the volume
  3    MNIST unavailable or corrupt; predict: an image could not be read
  4    requested device unavailable (--device gpu without a GPU)
  130  interrupted (Ctrl-C): rerun to resume from the last checkpoint
  143  stopped by SIGTERM after writing a checkpoint: rerun to resume
"""


class JobError(Exception):
    """An expected failure: reported as one line, no traceback."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(JobError):
    exit_code = ExitCode.USAGE


class Diverged(ConfigError):
    """The training loss or weights became NaN or infinite (a learning rate far
    too high). Exit 2: the same settings diverge the same way again."""


class DataError(JobError):
    exit_code = ExitCode.DATA


class DeviceError(JobError):
    exit_code = ExitCode.DEVICE


class Terminated(JobError):
    exit_code = ExitCode.TERMINATED


class OutOfMemory(JobError):
    """An allocation failed (e.g. --hidden-units far too wide). Exit 1, as when
    the kernel kills the process for memory: a node with more may succeed."""

    exit_code = ExitCode.FAILURE


class WorkerLost(JobError):
    """Another worker of a multi-worker run died or stopped answering. Exit 1:
    a retry (Kubernetes restarts the pods) resumes from the last checkpoint."""

    exit_code = ExitCode.FAILURE


# A full, read-only or forbidden volume: retrying on the same volume cannot help.
VOLUME_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def explain(err: BaseException) -> JobError | None:
    """One line for a failure of the machine rather than of the code, where a
    traceback would only bury the cause; None for anything else."""
    tf = sys.modules.get("tensorflow")  # not imported yet: not TensorFlow's error
    tf_exhausted = tf is not None and isinstance(err, tf.errors.ResourceExhaustedError)
    tf_denied = tf is not None and isinstance(err, tf.errors.PermissionDeniedError)
    if tf_exhausted or tf_denied:
        # TensorFlow's own file writes (SavedModel, TensorBoard) say "<path>; <strerror>".
        for code in VOLUME_ERRNOS:
            written = re.search(rf"(\S+); {re.escape(os.strerror(code))}", str(err))
            if written:
                where = f" (TensorFlow writing {written_target(written.group(1))})"
                return volume_error(os.strerror(code), where)
        if tf_denied:
            return volume_error(os.strerror(errno.EACCES), " (TensorFlow writing a file)")
    if isinstance(err, MemoryError) or tf_exhausted:
        # TensorFlow's message is a page of kernel and device names; the shape is the news.
        shape = re.search(r"OOM when allocating tensor with shape\[[^\]]*\]", str(err))
        return OutOfMemory(
            f"out of memory ({shape.group(0) if shape else type(err).__name__}): "
            "lower --hidden-units or --batch-size, or give the job more memory"
        )
    if isinstance(err, OSError) and err.errno in VOLUME_ERRNOS:
        where = f" writing {written_target(str(err.filename))}" if err.filename else ""
        return volume_error(err.strerror, where)
    return None


def written_target(path: str) -> str:
    """The file a write was for: `path` without the temporary directory that
    job.artifacts writes in (`.<name>.<host>.<pid>.<random>/<name>`)."""
    return re.sub(r"/\.([^/]+)\.[^/]+\.\d+\.[^/.]+/\1(?=/|$)", r"/\1", path)


@contextlib.contextmanager
def explained() -> Iterator[None]:
    """Inside the block, failures that `explain` knows become their JobError."""
    try:
        yield
    except Exception as err:
        job_error = explain(err)
        if job_error is None:
            raise
        raise job_error from err


def volume_error(reason: str, where: str) -> ConfigError:
    # Every file is written beside its target and renamed into place, so a
    # failed write leaves the previous checkpoint and artifacts as they were.
    return ConfigError(
        f"{reason}{where}: the checkpoints and files written before are intact; "
        "make room (or make the volume writable) and rerun the same command to resume"
    )


def abort_reason(err) -> str:
    """The line of a collective's abort message (TensorFlow's AbortedError or
    UnavailableError, a page of gRPC detail) that says why."""
    for line in err.message.splitlines():
        if "aborted by:" in line:
            return line.split("aborted by:", 1)[1].strip().rstrip(":")
    return type(err).__name__
