"""Progress reports to Kubeflow Trainer, against a real local HTTPS server with
its own CA (tests/status_server.py): the body, the token, the TLS check, and a
failed report being a warning only."""

from __future__ import annotations

import logging
import time

import pytest

from job import trainer_status
from job.trainer_status import Reporter
from tests import status_server
from tests.conftest import run_tiny_job


@pytest.fixture
def server(tmp_path):
    state, stop = status_server.serve(tmp_path)
    yield state
    stop()


def record(epoch: int, seconds: float = 2.0) -> dict:
    return {
        "epoch": epoch,
        "loss": 0.25,
        "accuracy": 0.93,
        "val_loss": 0.13,
        "val_accuracy": 0.96,
        "seconds": seconds,
        "images_per_second": 5000.0,
    }


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reporter_for(server, epochs: int, clock=time.monotonic) -> Reporter:
    environ = {
        trainer_status.URL: server.url,
        trainer_status.CA_CERT: str(server.ca_cert),
        trainer_status.TOKEN: str(server.token_file),
    }
    reporter = Reporter.from_env(epochs, environ)
    reporter.clock = clock
    return reporter


def test_no_reporter_without_trainers_variables():
    assert Reporter.from_env(5, {}) is None
    assert Reporter.from_env(5, {trainer_status.URL: "https://x"}) is None


def test_each_report_carries_progress_time_left_metrics_and_the_token(server):
    clock = Clock()
    reporter = reporter_for(server, epochs=4, clock=clock)
    for epoch in (1, 2, 3, 4):
        clock.now += 10
        assert reporter.epoch_end(record(epoch, seconds=3.0)) is True
    assert [r["path"] for r in server.requests] == [status_server.PATH] * 4
    headers = server.requests[0]["headers"]
    assert headers["Authorization"] == f"Bearer {status_server.TOKEN}"
    assert headers["Content-Type"] == "application/json"
    first, last = (body["trainerStatus"] for body in (server.bodies()[0], server.bodies()[-1]))
    assert first["progressPercentage"] == 25
    assert first["estimatedRemainingSeconds"] == 9  # 3 epochs left x 3 s
    assert first["metrics"] == [
        {"name": "loss", "value": "0.25"},
        {"name": "accuracy", "value": "0.93"},
        {"name": "val_loss", "value": "0.13"},
        {"name": "val_accuracy", "value": "0.96"},
    ]
    assert first["lastUpdatedTime"].endswith("Z") and len(first["lastUpdatedTime"]) == 20
    assert (last["progressPercentage"], last["estimatedRemainingSeconds"]) == (100, 0)


def test_reports_come_at_most_every_five_seconds_but_the_last_always(server):
    clock = Clock()
    reporter = reporter_for(server, epochs=3, clock=clock)
    sent = []
    for epoch in (1, 2, 3):
        clock.now += 1  # epochs of 1 s
        sent.append(reporter.epoch_end(record(epoch, seconds=1.0)))
    assert sent == [True, False, True]
    assert [b["trainerStatus"]["progressPercentage"] for b in server.bodies()] == [33, 100]


def test_the_token_is_read_again_for_each_report(server):
    clock = Clock()
    reporter = reporter_for(server, epochs=2, clock=clock)
    reporter.epoch_end(record(1))
    server.token_file.write_text("rotated")
    clock.now += 10
    reporter.epoch_end(record(2))
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer rotated"


@pytest.mark.parametrize("problem", ["http-error", "untrusted", "unreachable", "no-token"])
def test_a_failed_report_is_one_warning_line_never_an_error(server, tmp_path, caplog, problem):
    reporter = reporter_for(server, epochs=1)
    if problem == "http-error":
        server.answer = 403
    elif problem == "untrusted":  # a CA that did not sign the server's certificate
        (tmp_path / "other").mkdir()
        other, _, _ = status_server.make_ca(tmp_path / "other", ("localhost",))
        reporter.ca_cert = other
    elif problem == "unreachable":
        reporter.url = "https://127.0.0.1:9/status"
    else:
        reporter.token = tmp_path / "missing-token"
    with caplog.at_level(logging.WARNING, logger="job.trainer_status"):
        assert reporter.epoch_end(record(1)) is False
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("progress report to Kubeflow Trainer failed (training goes on): ")
    assert "\n" not in message
    if problem == "http-error":
        assert message.endswith("HTTP 403 Forbidden")


def test_a_training_run_in_a_trainjob_pod_reports_each_epoch(server, tmp_path):
    """The real CLI on tiny data with Trainer's variables set: the chief's
    epochs reach the server; the run itself is unaffected."""
    env = {
        trainer_status.URL: server.url,
        trainer_status.CA_CERT: str(server.ca_cert),
        trainer_status.TOKEN: str(server.token_file),
    }
    result = status_server_run(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    bodies = [b["trainerStatus"] for b in server.bodies()]
    assert bodies[-1]["progressPercentage"] == 100
    assert {m["name"] for m in bodies[-1]["metrics"]} == {
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
    }
    quiet = status_server_run(tmp_path / "quiet", env, "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert len(server.bodies()) == 2 * len(bodies), "--quiet must not stop the reports"

    server.answer = 500  # a failing server: one warning, same success
    result = status_server_run(tmp_path / "again", env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("progress report to Kubeflow Trainer failed") >= 1


def status_server_run(tmp_path, env, *extra):
    args = ["train", "--output-dir", str(tmp_path / "out"), "--epochs", "2", *extra]
    return run_tiny_job(*args, env=env)
