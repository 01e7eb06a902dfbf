"""`--profile-steps`: a profiler trace of exactly those steps, served by
TensorBoard's profile plugin; nothing at all when off."""

from __future__ import annotations

import gzip
import json
import urllib.request

import pytest

from job.errors import ExitCode
from job.loop import chunk_stop
from job.profiler import StepProfiler
from job.runner import run
from tests.conftest import error_lines, run_tiny_job
from tests.test_board import board, wait_for


def traces(tensorboard_dir):
    return sorted((tensorboard_dir / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_chunks_end_before_the_first_profiled_step_and_after_the_last(tmp_path):
    profiler = StepProfiler((15, 22), tmp_path)
    assert profiler.breaks == (14, 22)
    # An epoch of 10 steps: epoch 2 (global 10-20) is cut after global 14 ...
    assert chunk_stop(0, 10, 10, None, profiler.breaks) == 4
    assert chunk_stop(4, 10, 14, None, profiler.breaks) == 10
    # ... and epoch 3 after global 22, then runs to its end.
    assert chunk_stop(0, 10, 20, None, profiler.breaks) == 2
    assert chunk_stop(2, 10, 22, None, profiler.breaks) == 10
    # With --checkpoint-every too, whichever boundary is nearer.
    assert chunk_stop(0, 10, 10, 3, profiler.breaks) == 2


def test_off_or_on_a_worker_that_is_not_the_chief_it_does_nothing(tmp_path):
    for profiler in (StepProfiler(None, tmp_path), StepProfiler((1, 5), None)):
        assert profiler.breaks == ()
        profiler.chunk_starting(0)
        profiler.chunk_ended(5)
        profiler.stop()
    assert not (tmp_path / "plugins").exists()


def test_a_run_without_it_writes_no_trace(finished_run):
    config, _ = finished_run
    assert (config.tensorboard_path / "train").is_dir()
    assert traces(config.tensorboard_path) == []


def test_a_run_traces_exactly_the_steps_asked_for(tiny, tiny_config, caplog):
    # 10 steps an epoch: steps 4-13 span two epochs' chunks.
    config = tiny_config.replace(epochs=2, profile_steps=(4, 13))
    with caplog.at_level("INFO", logger="job.profiler"):
        result = run(config, datasets=tiny)
    assert len(traces(config.tensorboard_path)) == 1
    assert "Profiled steps 4-13 into" in caplog.text
    assert [r["epoch"] for r in result.metrics["history"]] == [1, 2]


def test_a_range_past_the_end_traces_up_to_the_last_step(tiny, tiny_config, caplog):
    config = tiny_config.replace(epochs=1, profile_steps=(8, 1000))
    with caplog.at_level("INFO", logger="job.profiler"):
        run(config, datasets=tiny)
    assert len(traces(config.tensorboard_path)) == 1
    assert "Profiled steps 8-10 into" in caplog.text


@pytest.mark.parametrize("value", ["5", "0,3", "7,2", "a,b"])
def test_a_bad_range_is_one_line_and_exit_2(value, tmp_path):
    done = run_tiny_job("train", "--profile-steps", value, "--output-dir", str(tmp_path))
    assert done.returncode == ExitCode.USAGE, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "--profile-steps" in line]
    assert "FIRST,LAST" in line, line
    assert not error_lines(done.stderr) or "Traceback" not in done.stderr


@pytest.mark.slow
def test_tensorboard_lists_the_trace_in_its_profile_tab(tmp_path):
    out = tmp_path / "out"
    done = run_tiny_job("train", "--epochs", "1", "--profile-steps", "2,6",
                        "--output-dir", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    [trace] = traces(out / "tensorboard")
    with board(str(out / "tensorboard"), tmp_path) as (client, server, log):
        wait_for(lambda: client.get("/data/plugins_listing")["profile"]["enabled"],
                 "the profile plugin", server, log, seconds=60)  # fmt: skip
        # The profile plugin answers gzip-compressed JSON.
        with urllib.request.urlopen(f"{client.base}/data/plugin/profile/runs") as response:
            body = response.read()
        runs = json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
        assert runs == [f"train/{trace.parent.name}"], runs
