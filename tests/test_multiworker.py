"""Two real worker processes on loopback with MultiWorkerMirroredStrategy."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from job.errors import ExitCode
from scripts.multiworker import free_ports, start_workers, supervise
from tests.conftest import ROOT, run_tiny_job, start_tiny_job

pytestmark = pytest.mark.slow

TRAIN = "960"  # 30 steps of the global batch 32 per epoch


def start_two_workers(*train_args: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Two tiny-job workers of one cluster on loopback; "{index}" in an argument
    becomes each worker's index."""
    commands = [
        [sys.executable, str(ROOT / "tests" / "tiny_job.py"), "train",
         *(arg.replace("{index}", str(index)) for arg in train_args)]
        for index in range(2)
    ]  # fmt: skip
    return start_workers(
        commands,
        env={**(env or {}), "TINY_JOB_TRAIN": TRAIN},
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_for_a_checkpoint(out, workers: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until the chief has checkpointed once: training is under way on both."""
    checkpoint = out / "checkpoints" / "latest.npz"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.1)


def test_two_workers_train_identically_and_only_the_chief_writes(tmp_path):
    workers = start_two_workers(
        "--epochs", "3", "--output-dir", str(tmp_path / "out-{index}"),
        env={"TINY_JOB_WEIGHTS": str(tmp_path / "weights-{index}.npz")},
    )  # fmt: skip
    logs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs

    chief, other = tmp_path / "out-0", tmp_path / "out-1"
    for name in ("metrics.json", "model.keras", "saved_model", "predictions.png", "tensorboard"):
        assert (chief / name).exists(), name
    assert not other.exists() or not any(other.iterdir()), "a non-chief worker wrote files"

    weights = [np.load(tmp_path / f"weights-{i}.npz") for i in range(2)]
    for key in weights[0].files:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])

    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["devices"] == {**metrics["devices"], "strategy": "multi-worker", "workers": 2}

    # The same global batch on one worker gives the same training, up to
    # floating-point summation order.
    single = run_tiny_job(
        "train", "--epochs", "3", "--output-dir", str(tmp_path / "single"),
        env={"TINY_JOB_TRAIN": TRAIN},
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(
        single_metrics["test"]["accuracy"], abs=0.02
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_local_runner_script_completes_one_output_dir(tmp_path, log_format):
    result = subprocess.run(
        [sys.executable, "scripts/multiworker.py", "--workers", "2",
         "--command", f"{sys.executable} tests/tiny_job.py",
         "--", "--epochs", "1", "--output-dir", str(tmp_path / "out"),
         "--log-format", log_format],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["devices"]["workers"] == 2
    # Every line says which worker wrote it, and both workers report their epoch:
    # text lines in a prefix, JSON lines (left parseable) in their own fields.
    epochs = set()
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "epoch":
                epochs.add(record["task_index"])
            assert record["task_type"] == "worker"
        else:
            assert line.startswith(("[worker 0] ", "[worker 1] ")), line
            if "epoch 1/1" in line:
                epochs.add(int(line[len("[worker ")]))
    assert epochs == {0, 1}


def test_sigterm_to_one_worker_stops_both_at_a_checkpoint_then_they_resume(tmp_path):
    out = tmp_path / "out"
    train_args = ("--epochs", "100", "--checkpoint-every", "10", "--output-dir", str(out))
    workers = start_two_workers(*train_args)
    wait_for_a_checkpoint(out, workers)
    workers[1].send_signal(signal.SIGTERM)  # only the non-chief is evicted
    logs = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [143, 143], logs
    assert not (out / "metrics.json").exists()

    workers = start_two_workers(*train_args)
    logs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    assert "Resuming from" in logs[0] and "Resuming from" in logs[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == list(range(1, 101))


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_losing_a_worker_fails_the_other_with_one_line_and_exit_1(tmp_path, failure):
    out = tmp_path / "out"
    workers = start_two_workers("--epochs", "300", "--output-dir", str(out))
    wait_for_a_checkpoint(out, workers)
    workers[1].send_signal(failure)
    try:
        _, log = workers[0].communicate(timeout=120)
    finally:
        workers[1].kill()
        workers[1].communicate()
    assert workers[0].returncode == 1, log
    assert "Traceback" not in log, log
    assert "mnist-job: error: lost contact with another worker at epoch" in log
    assert f"resume from the last checkpoint in {out / 'checkpoints'}" in log


def test_a_diverging_run_stops_every_worker_at_the_same_step_with_exit_2(tmp_path):
    out = tmp_path / "out"
    workers = start_two_workers("--learning-rate", "1e30", "--output-dir", str(out))
    logs = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [2, 2], logs
    errors = [
        [line for line in log.splitlines() if "mnist-job: error: training diverged" in line]
        for log in logs
    ]
    assert len(errors[0]) == 1 and errors[0] == errors[1], logs  # same epoch, same step
    assert not (out / "checkpoints" / "latest.npz").exists()


def test_overwrite_of_a_finished_run_starts_every_worker_over(tmp_path):
    # The chief deletes the finished run late, after every check; the other
    # worker must not resume from the old checkpoint in the meantime.
    out = tmp_path / "out"
    for _ in range(2):
        workers = start_two_workers("--epochs", "2", "--output-dir", str(out), "--overwrite")
        logs = [worker.communicate(timeout=300)[1] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], logs
    assert "replacing the finished run" in logs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] is None
    assert [record["epoch"] for record in metrics["history"]] == [1, 2]


def start_one_of_two(index: int, *train_args: str) -> tuple[subprocess.Popen, list[str]]:
    """Worker `index` of a two-worker cluster whose other worker never starts;
    and the addresses of both."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    worker = start_tiny_job(
        "train", *train_args, env={"TF_CONFIG": json.dumps(tf_config), "TINY_JOB_TRAIN": TRAIN}
    )
    return worker, addresses


@pytest.mark.parametrize("index", [0, 1], ids=["chief-alone", "worker-alone"])
def test_a_worker_whose_peer_never_comes_exits_1_naming_it(tmp_path, index):
    started = time.monotonic()
    worker, addresses = start_one_of_two(
        index, "--join-timeout", "5", "--output-dir", str(tmp_path / "out")
    )
    _, log = worker.communicate(timeout=120)
    assert worker.returncode == 1, log
    assert time.monotonic() - started < 60, "start-up plus the 5 s timeout"
    missing = (
        f"missing worker 1 ({addresses[1]})"
        if index == 0
        else f"the chief, worker 0 ({addresses[0]}), has not started"
    )
    assert log.strip().splitlines()[-1] == (
        f"mnist-job: error: workers did not join within 5 s: {missing}"
    )
    assert "Traceback" not in log


@pytest.mark.parametrize("index", [0, 1], ids=["chief", "worker"])
def test_sigterm_while_waiting_to_join_ends_the_worker_at_once(tmp_path, index):
    # A preempted pod group: the chief that one worker waits for has already gone.
    worker, _ = start_one_of_two(index, "--output-dir", str(tmp_path / "out"))
    for line in worker.stderr:  # until it waits
        if "Waiting for all 2 workers to join" in line:
            break
    time.sleep(1)
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    worker.communicate(timeout=60)
    assert worker.returncode in (ExitCode.TERMINATED, -signal.SIGTERM)
    assert time.monotonic() - sent < 5, "SIGTERM took too long to honour"


def test_a_second_launch_on_a_finished_run_exits_2_without_hanging(tmp_path):
    # The chief refuses the finished run before joining; the other worker, left
    # waiting for it, is stopped by the launcher, not by its --join-timeout.
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "scripts/multiworker.py", "--workers", "2",
         "--command", f"{sys.executable} tests/tiny_job.py", "--", "--output-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "holds a finished run" in result.stderr
    assert time.monotonic() - started < 120, "a worker waited for the one that had exited"


def test_the_launcher_stops_the_others_when_one_fails(tmp_path):
    # Worker 0 fails at once; worker 1 ignores SIGTERM, so it takes the SIGKILL.
    fails = [sys.executable, "-c", "import time; time.sleep(0.5); raise SystemExit(3)"]
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    stuck = [sys.executable, "-c", ignore + "time.sleep(600)"]
    workers = start_workers([fails, stuck])
    started = time.monotonic()
    assert supervise(workers, grace=1) == 3
    assert workers[1].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 30


def test_the_launcher_waits_for_every_worker_that_succeeds():
    quick = [sys.executable, "-c", "pass"]
    slower = [sys.executable, "-c", "import time; time.sleep(2)"]
    workers = start_workers([quick, slower])
    assert supervise(workers, grace=1) == 0
    assert [worker.returncode for worker in workers] == [0, 0]
