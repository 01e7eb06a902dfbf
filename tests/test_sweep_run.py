"""`sweep run` end to end on tiny data: trials as processes of their own, CPUs
shared between them, a failed trial that does not stop the others, SIGTERM
that checkpoints every running trial, and a rerun that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from job import sweep_run
from job.errors import ExitCode
from job.strategy import cpu_threads
from tests.conftest import ROOT, error_lines, run_tiny_job, start_tiny_job

SPEC = {
    "fixed": {"num-images": 0},
    "trials": [
        {"epochs": 2},
        {"epochs": 200, "checkpoint-every": 5},  # long enough to be stopped midway
        {"epochs": 2, "learning-rate": 1e30},  # diverges: Diverged, exit 2
        {"epochs": 2, "hidden-units": "32"},
    ],
}


def test_cpu_slots_divide_the_cpus_between_the_trials():
    for parallel in (1, 2, 3):
        slots = sweep_run.cpu_slots(parallel)
        each = max(1, cpu_threads() // parallel)
        assert len(slots) == parallel and all(len(s) == each for s in slots)
        if each * parallel <= cpu_threads():
            assert len(set().union(*slots)) == each * parallel, "no core shared"


def test_trials_start_as_this_process_started(tmp_path):
    """As a script (the `mnist-job` script, or the tests' tiny-data entry
    point) or as a module (`python -m job`): the trials are started the same way."""
    script = tmp_path / "entry.py"
    script.write_text("import json\nfrom job.sweep_run import entry_point\n"
                      "print(json.dumps(entry_point()))\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for how, expected in (
        ([str(script)], [sys.executable, str(script)]),
        (["-m", "entry"], [sys.executable, "-m", "entry"]),
    ):
        printed = subprocess.run(
            [sys.executable, *how], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert json.loads(printed.stdout) == expected, printed.stderr


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def statuses(out) -> dict[int, str]:
    report = json.loads((out / "report.json").read_text())
    return {t["trial"]: t["status"] for t in report["trials"]}


@pytest.mark.slow
def test_sweep_stopped_midway_resumes_and_a_failed_trial_stops_no_other(tmp_path):
    spec, out = tmp_path / "spec.json", tmp_path / "sweep"
    spec.write_text(json.dumps(SPEC))
    args = ("sweep", "run", str(spec), "--output-dir", str(out))

    # One at a time; SIGTERM while trial 1 trains.
    first = start_tiny_job(*args, "--parallel", "1")
    wait_for(out / "trial-1" / "checkpoints" / "latest.npz", first)
    time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == ExitCode.TERMINATED, stderr
    assert "stopped by SIGTERM: trials [1] checkpointed" in stderr.strip().splitlines()[-1]
    assert (out / "trial-0" / "metrics.json").exists()
    assert not (out / "trial-1" / "metrics.json").exists()
    assert "stopped by SIGTERM" in (out / "trial-1.log").read_text()  # it checkpointed, 143
    assert not (out / "trial-2").exists() and not (out / "trial-3").exists()
    report = run_tiny_job("sweep", "report", str(out))
    assert report.returncode == 0, report.stderr
    found = statuses(out)
    assert found[0] == "finished"
    assert found[1].startswith("epoch ") and found[1].split()[1].endswith("/200")
    assert found[2] == found[3] == "not started"

    # The same command, two at a time: 0 is skipped, 1 resumes, 2 diverges.
    second = run_tiny_job(*args, "--parallel", "2")
    assert second.returncode == ExitCode.FAILURE, second.stderr
    assert "1 of 4 trials already finished" in second.stderr
    assert error_lines(second.stderr) == [
        f"mnist-job: error: 1 of 4 trials failed: trial 2 (exit 2); see {out}/report.md and "
        "the trials' logs"
    ]
    assert "Resuming from" in (out / "trial-1.log").read_text()
    assert "training diverged" in (out / "trial-2.log").read_text()
    trial_1 = json.loads((out / "trial-1" / "metrics.json").read_text())
    assert trial_1["resumed_from"] is not None and len(trial_1["history"]) == 200
    # Two at once on this machine: each TensorFlow sized for its share.
    for index in (1, 3):
        metrics = json.loads((out / f"trial-{index}" / "metrics.json").read_text())
        assert metrics["devices"]["cpu_threads"] == max(1, cpu_threads() // 2)

    report = json.loads((out / "report.json").read_text())
    ranked = [t for t in report["trials"] if t["rank"]]
    assert [t["rank"] for t in ranked] == [1, 2, 3]
    assert {t["trial"] for t in ranked} == {0, 1, 3}
    accuracies = [t["metrics"]["test_accuracy"] for t in ranked]
    assert accuracies == sorted(accuracies, reverse=True)
    failed = statuses(out)[2]
    assert failed.startswith("failed (exit 2): training diverged")
    assert second.stdout.startswith("| rank | trial | epochs |")  # the ranked table, printed
    assert (out / "report.md").read_text().count("| finished |") == 3
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
