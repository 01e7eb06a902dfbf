"""Surviving preemption: kill -9 and SIGTERM mid-run, then the same command again."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from job.errors import ExitCode
from tests.conftest import run_tiny_job, start_tiny_job
from tests.events import scalars

pytestmark = pytest.mark.slow

EPOCHS = 200


def start_job(out, *extra):
    args = ["train", "--output-dir", str(out), "--epochs", str(EPOCHS), "--checkpoint-every", "5"]
    return start_tiny_job(*args, *extra)


def wait_for_checkpoint(out, process, timeout=120):
    checkpoint = out / "checkpoints" / "latest.npz"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.5)  # let it train a little past the first checkpoint
    return checkpoint


def assert_complete(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, EPOCHS + 1))
    for name in ("model.keras", "saved_model", "predictions.png"):
        assert (out / name).exists(), name
    assert not list(out.glob(".*")), "temporary files left behind"
    # The step axis continues: no epoch logged twice, none after a restart.
    steps = [step for step, _ in scalars(out / "tensorboard" / "train")["epoch_loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == EPOCHS
    return metrics


def test_kill_9_then_rerun_resumes_and_completes(tmp_path):
    out = tmp_path / "out"
    process = start_job(out)
    wait_for_checkpoint(out, process)
    process.kill()
    process.wait()
    assert not (out / "metrics.json").exists()

    rerun = run_tiny_job(
        "train", "--output-dir", str(out), "--epochs", str(EPOCHS), "--checkpoint-every", "5"
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming from" in rerun.stderr
    metrics = assert_complete(out)
    resumed = metrics["resumed_from"]
    assert resumed["epoch"] * 10 + resumed["step"] > 0


def test_sigterm_checkpoints_and_exits_143_then_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    process = start_job(out)
    checkpoint = wait_for_checkpoint(out, process)
    before = checkpoint.stat().st_mtime_ns
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == ExitCode.TERMINATED, stderr
    assert time.monotonic() - sent < 5, "SIGTERM took too long to honour"
    assert checkpoint.stat().st_mtime_ns > before, "no checkpoint written on SIGTERM"
    assert "rerun the same command to resume" in stderr.strip().splitlines()[-1]

    rerun = run_tiny_job(
        "train", "--output-dir", str(out), "--epochs", str(EPOCHS), "--checkpoint-every", "5"
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming from" in rerun.stderr
    assert_complete(out)


def test_sigterm_before_training_starts_is_clean(tmp_path):
    """Eviction can come at any moment; early on there is nothing to lose."""
    process = start_job(tmp_path / "out")
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode in (ExitCode.TERMINATED, -signal.SIGTERM)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_rerun_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "out"
    first = run_tiny_job("train", "--output-dir", str(out), "--epochs", "1")
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_tiny_job("train", "--output-dir", str(out), "--epochs", "1")
    assert again.returncode == ExitCode.USAGE
    assert "--overwrite" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    os.sync()
