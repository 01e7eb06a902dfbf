"""One writer per directory: a second one is refused at once, naming the
holder; a killed holder never blocks the next run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from job import dirlock
from job.errors import ConfigError, ExitCode
from tests.conftest import error_lines, run_tiny_job, start_tiny_job

HOLD_IN_A_CHILD = textwrap.dedent(
    """
    import sys, time
    from job import dirlock
    with dirlock.held(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def hold_in_a_child(directory) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_A_CHILD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    holder = hold_in_a_child(tmp_path)
    try:
        refused = pytest.raises(ConfigError, match=rf"in use by process {holder.pid} on ")
        with refused as err, dirlock.held(tmp_path):
            pass
        assert err.value.exit_code == ExitCode.USAGE
        assert str(tmp_path) in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_never_blocks_the_next_one(tmp_path):
    holder = hold_in_a_child(tmp_path)
    holder.kill()  # SIGKILL: no chance to release or remove anything
    holder.wait()
    assert (tmp_path / dirlock.LOCK_NAME).exists()
    with dirlock.held(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []  # released and removed


def test_one_process_cannot_hold_a_directory_twice(tmp_path):
    refused = pytest.raises(ConfigError, match="in use by process")
    with dirlock.held(tmp_path), refused, dirlock.held(tmp_path):
        pass


def test_the_lock_names_its_holder_while_held(tmp_path):
    with dirlock.held(tmp_path):
        text = (tmp_path / dirlock.LOCK_NAME).read_text()
    assert text.startswith(f"process {os.getpid()} on ")


@pytest.mark.slow
def test_two_runs_started_together_on_one_dir_one_trains_the_other_exits_2(tmp_path):
    """As when a replacement pod starts while the old one still runs."""
    for attempt in range(10):
        out = tmp_path / f"out-{attempt}"
        args = ["train", "--output-dir", str(out), "--epochs", "2"]
        first = start_tiny_job(*args)
        time.sleep(attempt / 9)  # 0 to 1 s apart
        second = start_tiny_job(*args)
        results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
        for process in (first, second):
            process.stdout.close()
            process.stderr.close()
        codes = sorted(code for code, _ in results)
        assert codes == [ExitCode.OK, ExitCode.USAGE], (attempt, results)
        refused = next(stderr for code, stderr in results if code == ExitCode.USAGE)
        assert len(error_lines(refused)) == 1 and "Traceback" not in refused, refused
        assert re.search(r"is in use by process \d+ on |holds a finished run", refused), refused
        finished = (out / "metrics.json").read_bytes()
        assert [r["epoch"] for r in json.loads(finished)["history"]] == [1, 2]
        assert run_tiny_job(*args).returncode == ExitCode.USAGE  # still not replaced
        assert (out / "metrics.json").read_bytes() == finished
        assert not (out / dirlock.LOCK_NAME).exists()
