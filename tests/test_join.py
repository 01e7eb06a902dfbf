"""Workers meeting before TensorFlow joins them: in threads of this process,
on loopback ports, without TensorFlow."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import pytest

from job import join
from job.config import TrainConfig
from job.errors import ConfigError, WorkerLost
from scripts.multiworker import free_ports


def cluster(count: int) -> dict[str, list[str]]:
    return {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}


def meet_in_threads(spec, indexes, timeout: float) -> dict[int, BaseException | float]:
    """Each index in a thread of its own: its error, or the seconds it took."""
    results = {}

    def one(index):
        started = time.monotonic()
        try:
            join.meet(spec, "worker", index, timeout)
            results[index] = time.monotonic() - started
        except Exception as err:
            results[index] = err

    threads = [threading.Thread(target=one, args=(index,)) for index in indexes]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # the chief need not be first
    for thread in threads:
        thread.join(timeout + 10)
    return results


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0]], ids=["chief-first", "chief-last"])
def test_every_worker_goes_once_all_have_joined(order):
    spec = cluster(3)
    results = meet_in_threads(spec, order, timeout=10)
    assert all(isinstance(seconds, float) and seconds < 5 for seconds in results.values()), results
    # The chief's port is free again for TensorFlow's server.
    socket.create_server(("", int(spec["worker"][0].rpartition(":")[2]))).close()


def test_the_chief_names_the_worker_that_never_came():
    spec = cluster(3)
    started = time.monotonic()
    results = meet_in_threads(spec, [0, 1], timeout=1.5)
    assert time.monotonic() - started < 5
    for index in (0, 1):  # the other worker learns who is missing from the chief
        assert isinstance(results[index], WorkerLost), results
        assert str(results[index]) == (
            f"workers did not join within 1.5 s: missing worker 2 ({spec['worker'][2]})"
        )


def test_a_worker_names_the_chief_that_never_came():
    spec = cluster(2)
    results = meet_in_threads(spec, [1], timeout=1)
    assert str(results[1]) == (
        f"workers did not join within 1 s: the chief, worker 0 ({spec['worker'][0]}), "
        "has not started"
    )


def test_a_worker_that_joined_and_left_is_waited_for_again(caplog):
    spec = cluster(3)  # worker 2 never comes, so the chief cannot say go yet
    chief = threading.Thread(target=lambda: results.update(meet_in_threads(spec, [0], 1.5)))
    results = {}
    chief.start()
    host, _, port = spec["worker"][0].rpartition(":")
    for _ in range(50):
        with contextlib.suppress(OSError), socket.create_connection((host, int(port))) as gone:
            gone.sendall(b"join worker 1\n")
            time.sleep(0.3)
            break  # and hang up, as if killed, before the chief said go
        time.sleep(0.1)
    chief.join()
    assert str(results[0]).endswith(f"missing {join.names(join.joining_tasks(spec)[1:])}")
    assert f"worker 1 ({spec['worker'][1]}) left before every worker joined" in caplog.text


def test_a_chief_and_a_chief_task(caplog):
    spec = {"chief": cluster(1)["worker"], "worker": cluster(1)["worker"]}
    results = {}

    def one(kind):
        try:
            join.meet(spec, kind, 0, 10)
            results[kind] = "joined"
        except Exception as err:
            results[kind] = err

    threads = [threading.Thread(target=one, args=(kind,)) for kind in ("worker", "chief")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {"chief": "joined", "worker": "joined"}


def test_nobody_to_wait_for():
    join.meet(cluster(1), "worker", 0, 0.1)  # one worker
    join.meet({**cluster(2), "evaluator": ["127.0.0.1:1"]}, "evaluator", 0, 0.1)


def test_a_progress_line_says_who_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(join, "PROGRESS_SECONDS", 0.4)
    spec = cluster(2)
    with caplog.at_level(logging.INFO, logger="job.join"), pytest.raises(WorkerLost):
        join.meet(spec, "worker", 0, 1.5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Still waiting")]
    assert 2 <= len(lines) <= 4, lines
    assert lines[0].endswith(f"of 1.5 s: missing worker 1 ({spec['worker'][1]})")


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_the_join_timeout_is_a_positive_number_of_seconds(seconds):
    with pytest.raises(ConfigError, match="--join-timeout must be a positive number"):
        TrainConfig(join_timeout=seconds)
