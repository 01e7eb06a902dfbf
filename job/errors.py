"""Errors that end the job with a documented exit code.

Kubernetes' podFailurePolicy keys on these codes, so they are part of the
job's interface: change one and you change how clusters treat a failed pod.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything unexpected: a bug, out of memory; worth a retry
    USAGE = 2  # bad option, bad config, unusable output dir: retrying won't help
    DATA = 3  # MNIST unavailable or corrupt; predict: an input image unreadable
    DEVICE = 4  # the requested device (GPU) is not visible
    INTERRUPTED = 130  # Ctrl-C (128 + 2): rerun resumes from the last checkpoint
    TERMINATED = 143  # SIGTERM (128 + 15): checkpoint written, rerun resumes


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
