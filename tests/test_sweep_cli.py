"""`mnist-job sweep trial`, as each pod of k8s/sweep.yaml runs it: the trial
its JOB_COMPLETION_INDEX names, metrics on stdout for stdout collectors, and
every failure in one line with the code the Job's podFailurePolicy expects."""

from __future__ import annotations

import json
import re

import pytest

from job.errors import ExitCode
from tests.conftest import error_lines, run_job, run_tiny_job

# Katib's stdout metrics collector's default filter (its `metricsFormat`).
KATIB_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"fixed": {"epochs": 1, "num-images": 0}, "grid": {"seed": [0, 1]}}))
    return path


def test_trial_runs_the_index_of_its_pod_and_prints_only_metrics(spec, tmp_path):
    out = tmp_path / "sweep"
    env = {"JOB_COMPLETION_INDEX": "1"}
    result = run_tiny_job("sweep", "trial", str(spec), "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "trial-1" / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 1 and metrics["config"]["epochs"] == 1
    assert not (out / "trial-0").exists()
    assert json.loads((out / "sweep.json").read_text())["varied"] == ["seed"]
    # stdout is the metrics and nothing else: what a stdout collector parses.
    lines = result.stdout.splitlines()
    assert [line.split("=")[0] for line in lines] == ["test_accuracy", "test_loss"]
    assert all(re.fullmatch(KATIB_FORMAT, line) for line in lines)
    printed = {name: float(value) for name, value in (line.split("=") for line in lines)}
    assert printed["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-5)
    assert printed["test_loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)
    assert "Wrote model" in result.stderr  # the logs: on stderr

    # A pod run again for a finished index: nothing trained, the same metrics.
    again = run_tiny_job("sweep", "trial", str(spec), "--output-dir", str(out), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout
    assert "already finished" in again.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--index", "2"], {}, "--index 2: the sweep has 2 trials (0-1)"),
        ([], {}, "Missing option '--index'"),
        ([], {"JOB_COMPLETION_INDEX": "x"}, "Invalid value for '--index'"),
    ],
)
def test_a_bad_index_is_one_line_and_exit_2(spec, tmp_path, args, env, message):
    env = {"JOB_COMPLETION_INDEX": "", **env}
    result = run_job("sweep", "trial", str(spec), "--output-dir", str(tmp_path), *args, env=env)
    assert result.returncode == ExitCode.USAGE
    (line,) = result.stderr.strip().splitlines()
    assert message in line


def test_a_dir_of_another_sweep_is_refused_before_training(spec, tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"trials": [{"index": 0, "settings": {}}]}))
    env = {"JOB_COMPLETION_INDEX": "0"}
    result = run_job("sweep", "trial", str(spec), "--output-dir", str(tmp_path), env=env)
    assert result.returncode == ExitCode.USAGE
    assert error_lines(result.stderr) == [
        f"mnist-job: error: {tmp_path}/sweep.json holds another sweep (its trials differ from "
        "this spec's): choose another --output-dir, or rerun with the spec that made it"
    ]
    assert not (tmp_path / "trial-0").exists()


def test_a_trial_that_fails_records_why(tmp_path):
    """An invalid setting only the run itself can reject (a batch larger than
    the training images): exit 2, which k8s/sweep.yaml fails that index on."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"trials": [{"batch-size": 1000, "epochs": 1}]}))
    out = tmp_path / "sweep"
    result = run_tiny_job("sweep", "trial", str(spec), "--index", "0", "--output-dir", str(out))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert result.stdout == ""
    failed = json.loads((out / "trial-0" / "failed.json").read_text())
    assert failed["exit_code"] == 2
    assert failed["error"].startswith("--batch-size 1000 is larger than the 320 training images")
    assert error_lines(result.stderr) == [f"mnist-job: error: {failed['error']}"]


@pytest.mark.slow
def test_trials_and_the_report_in_a_bucket(stores, spec, tmp_path):
    """A pod writing its trial to s3:// (no volume), then the report there."""
    from job import storage

    uri = stores["s3"].uri("sweep")
    env = {"JOB_COMPLETION_INDEX": "0", "MNIST_JOB_STAGING_DIR": str(tmp_path / "staging")}
    result = run_tiny_job("sweep", "trial", str(spec), "--output-dir", uri, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("test_accuracy=")
    report = run_tiny_job("sweep", "report", uri)
    assert report.returncode == 0, report.stderr
    found = json.loads(storage.read_bytes(f"{uri}/report.json"))
    assert [(t["trial"], t["status"]) for t in found["trials"]] == [
        (0, "finished"),
        (1, "not started"),
    ]
    assert storage.read_bytes(f"{uri}/report.png")[:4] == b"\x89PNG"
    assert json.loads(storage.read_bytes(f"{uri}/sweep.json"))["varied"] == ["seed"]
