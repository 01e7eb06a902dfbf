"""job.artifacts: a result appears complete or not at all, and an output dir
that cannot take our files is a configuration error before any training."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.artifacts import atomic_path, ensure_writable_dir, write_bytes, write_json
from job.errors import ConfigError, ExitCode


def names(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# -- atomic_path ---------------------------------------------------------------------


def test_a_write_appears_only_when_complete(tmp_path):
    target = tmp_path / "metrics.json"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert not target.exists()  # a reader never sees it half-written
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert names(tmp_path) == ["metrics.json"]  # no temporary behind


def test_a_failed_write_leaves_the_old_target_untouched_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["metrics.json"]


def test_a_failed_first_write_leaves_no_target(tmp_path):
    target = tmp_path / "predictions.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert names(tmp_path) == []


def test_a_directory_target_is_replaced_whole(tmp_path):
    target = tmp_path / "saved_model"
    target.mkdir()
    (target / "old.pb").write_bytes(b"old")
    (target / "variables").mkdir()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.pb").write_bytes(b"new")
        assert names(target) == ["old.pb", "variables"]  # the old one until the end
    assert names(target) == ["new.pb"]  # nothing of the old one mixed in
    assert names(tmp_path) == ["saved_model"]


def test_a_failed_directory_write_leaves_the_old_directory(tmp_path):
    target = tmp_path / "saved_model"
    target.mkdir()
    (target / "old.pb").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.pb").write_bytes(b"new")
        raise RuntimeError
    assert names(target) == ["old.pb"]
    assert names(tmp_path) == ["saved_model"]


def test_the_temporary_keeps_the_targets_name_and_lies_beside_it(tmp_path):
    # Keras refuses to save a model to a path not ending in .keras; a rename
    # is atomic only within one filesystem.
    target = tmp_path / "model.keras"
    with atomic_path(target) as tmp:
        assert tmp.name == "model.keras" and tmp.suffix == ".keras"
        assert tmp.parent.parent == tmp_path
        tmp.write_bytes(b"model")
    assert target.read_bytes() == b"model"


def test_missing_parent_dirs_are_created(tmp_path):
    target = tmp_path / "out" / "tensorboard" / "figure.png"
    write_bytes(target, b"png")
    assert target.read_bytes() == b"png"


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temporary(directory: Path, name: str, owner: str, age_seconds: float = 0) -> str:
    """A `.<name>.<owner>` temporary as a write leaves it, `age_seconds` old."""
    tmp = directory / f".{name}.{owner}"
    tmp.mkdir()
    (tmp / name).write_bytes(b"half")
    then = time.time() - age_seconds
    os.utime(tmp, (then, then))
    return tmp.name


def test_the_next_write_sweeps_the_temporaries_of_a_killed_one(tmp_path):
    host = socket.gethostname()
    # A write killed mid-way (SIGKILL, OOM) on this host: its process is gone.
    temporary(tmp_path, "model.keras", f"{host}.{dead_pid()}.k1ll3d")
    # Another host's, or of an older version: gone once an hour old.
    temporary(tmp_path, "model.keras", "elsewhere.7.0ld", age_seconds=7200)
    # Another target's: not this write's to sweep, however old.
    other = temporary(tmp_path, "metrics.json", f"{host}.{dead_pid()}.0ther", 7200)
    write_bytes(tmp_path / "model.keras", b"model")
    assert names(tmp_path) == [other, "model.keras"]


def test_the_next_write_leaves_a_live_writers_temporary_alone(tmp_path):
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            live = temporary(tmp_path, "model.keras", f"{host}.{writer.pid}.l1ve", 7200)
            recent = temporary(tmp_path, "model.keras", "elsewhere.7.n0w")
            write_bytes(tmp_path / "model.keras", b"model")
            assert names(tmp_path) == sorted([live, recent, "model.keras"])
        finally:
            writer.kill()


# -- write_json ----------------------------------------------------------------------


def test_write_json_refuses_nan_rather_than_write_what_is_not_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "metrics.json", {"loss": math.nan})
    assert names(tmp_path) == []


def test_write_json_round_trips_in_the_order_given(tmp_path):
    target = tmp_path / "metrics.json"
    metrics = {
        "test_accuracy": 0.97,
        "history": [{"epoch": 1, "loss": 0.3}],
        "resumed_from": None,
        "device": "CPU \u00b5",
    }
    write_json(target, metrics)
    text = target.read_text()
    assert json.loads(text) == metrics
    assert list(json.loads(text)) == list(metrics)  # readable: as the job ordered it
    assert text.endswith("}\n")


def test_write_json_replaces_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"epochs": 1, "extra": True})
    write_json(target, {"epochs": 2})
    assert json.loads(target.read_text()) == {"epochs": 2}


# -- ensure_writable_dir --------------------------------------------------------------


def test_an_output_dir_that_cannot_be_made_is_a_config_error(tmp_path):
    # (Tests run as root, whom a read-only mode does not stop: a regular file
    # in the path does.)
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path / "file" / "sub"
    with pytest.raises(ConfigError, match=re.escape(f"output dir {path} is not writable")) as err:
        ensure_writable_dir(path, "output dir")
    assert err.value.exit_code == ExitCode.USAGE == 2  # a retry would fail the same way


def test_a_writable_output_dir_is_created_and_left_empty(tmp_path):
    path = tmp_path / "out" / "run"
    ensure_writable_dir(path, "output dir")
    assert path.is_dir()
    assert names(path) == []  # the probe file is gone
