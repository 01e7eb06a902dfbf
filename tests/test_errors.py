"""Every expected failure maps to one line and a documented exit code."""

from __future__ import annotations

import errno
import re

import pytest
import tensorflow as tf

from job import errors
from job.errors import EXIT_CODES_HELP, ConfigError, ExitCode, OutOfMemory


def test_a_full_disk_in_tensorflow_is_a_volume_error_not_out_of_memory():
    from job.errors import explain

    err = tf.errors.ResourceExhaustedError(
        None, None, "/out/saved_model.tmp/variables/x.data; No space left on device"
    )
    explained = explain(err)
    assert isinstance(explained, ConfigError) and explained.exit_code == 2
    assert str(explained).startswith(
        "No space left on device (TensorFlow writing /out/saved_model.tmp/variables/x.data): "
    )
    assert "out of memory" in str(explain(tf.errors.ResourceExhaustedError(None, None, "OOM")))


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM]
)
def test_a_full_or_read_only_volume_is_exit_2_and_says_the_files_are_intact(code):
    temporary = "/out/.metrics.json.host.1.a1b2c3d4/metrics.json"  # as job.artifacts names it
    explained = errors.explain(OSError(code, "volume trouble", temporary))
    assert explained.exit_code == ExitCode.USAGE
    assert str(explained).startswith("volume trouble writing /out/metrics.json: ")
    assert "intact" in str(explained)


def test_out_of_memory_is_exit_1_and_a_bug_stays_a_traceback():
    oom = errors.explain(
        tf.errors.ResourceExhaustedError(
            None, None, "OOM when allocating tensor with shape[784,99999] and type float"
        )
    )
    assert isinstance(oom, OutOfMemory) and oom.exit_code == ExitCode.FAILURE
    assert "shape[784,99999]" in str(oom)
    assert isinstance(errors.explain(MemoryError()), OutOfMemory)
    assert errors.explain(ValueError("a bug")) is None
    assert errors.explain(OSError(errno.ENOENT, "No such file or directory")) is None


def test_explained_raises_the_job_error_and_keeps_the_cause():
    cause = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ConfigError) as err, errors.explained():
        raise cause
    assert err.value.__cause__ is cause
    with pytest.raises(KeyError), errors.explained():
        raise KeyError("not ours to explain")


def test_abort_reason_is_the_line_that_says_why():
    message = "Collective ops is aborted by: task /job:worker/task:1 heartbeat timeout:\ndetail"
    err = tf.errors.UnavailableError(None, None, message)
    assert errors.abort_reason(err) == "task /job:worker/task:1 heartbeat timeout"
    assert errors.abort_reason(tf.errors.AbortedError(None, None, "gone")) == "AbortedError"


def test_the_help_documents_every_exit_code():
    documented = {int(code) for code in re.findall(r"^\s+(\d+)\s", EXIT_CODES_HELP, re.M)}
    assert documented == {int(code) for code in ExitCode}


def test_tensorflow_denied_a_write_names_the_file_it_was_writing():
    path = "/out/.saved_model.host.1.a1b2c3d4/saved_model/variables"
    err = tf.errors.PermissionDeniedError(None, None, f"{path}; Read-only file system")
    explained = errors.explain(err)
    assert explained.exit_code == ExitCode.USAGE
    assert str(explained).startswith(
        "Read-only file system (TensorFlow writing /out/saved_model/variables): "
    )
