"""The lease that keeps a second run out of an output dir in a bucket.

gcp-storage-emulator ignores GCS's preconditions (`ifGenerationMatch`), so
the tests that need a conditional write to fail (a takeover race, a holder
learning it lost the lock) run against S3 only; on GCS the lock relies on
the same preconditions, which the real service enforces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from job import bucketlock, storage
from job.errors import ConfigError


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    monkeypatch.setattr(bucketlock, "LEASE_SECONDS", 3.0)
    monkeypatch.setattr(bucketlock, "HEARTBEAT_SECONDS", 0.5)


def lock_body(uri):
    return json.loads(storage.read_bytes(storage.join(uri, bucketlock.LOCK_NAME)))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_held_names_its_holder_and_is_gone_when_released(store):
    uri = store.uri()
    with bucketlock.held(uri):
        assert lock_body(uri)["holder"].startswith("process ")
    assert not storage.exists(storage.join(uri, bucketlock.LOCK_NAME))
    with bucketlock.held(uri):  # free again
        pass


def test_a_live_holder_keeps_a_second_run_out(store):
    uri = store.uri()
    with bucketlock.held(uri):
        started = time.monotonic()
        with (
            pytest.raises(ConfigError, match=r"is in use by process \d+ on "),
            bucketlock.held(uri),
        ):
            pass
        # Refused as soon as the holder renewed, not after the whole lease.
        assert time.monotonic() - started < bucketlock.LEASE_SECONDS


def test_a_killed_holder_on_this_host_is_taken_over_at_once(store):
    uri = store.uri()
    body = {"holder": "process 1 (killed)", "host": __import__("socket").gethostname()}
    storage.write_bytes(
        storage.join(uri, bucketlock.LOCK_NAME), json.dumps({**body, "pid": dead_pid()}).encode()
    )
    started = time.monotonic()
    with bucketlock.held(uri):
        assert time.monotonic() - started < 1.0
        assert lock_body(uri)["holder"] != body["holder"]


def test_a_holder_elsewhere_that_stopped_renewing_is_taken_over_after_the_lease(store):
    uri = store.uri()
    stale = {"holder": "process 7 on a-node-gone", "host": "a-node-gone", "pid": 7}
    storage.write_bytes(storage.join(uri, bucketlock.LOCK_NAME), json.dumps(stale).encode())
    started = time.monotonic()
    with bucketlock.held(uri):
        waited = time.monotonic() - started
    assert bucketlock.LEASE_SECONDS <= waited < bucketlock.LEASE_SECONDS + 3


def test_a_missing_bucket_is_one_line(store):
    with (
        pytest.raises(ConfigError, match="no such bucket"),
        bucketlock.held(f"{store.scheme}://no-such-bucket-for-locks/run"),
    ):
        pass


def test_of_runs_creating_the_lock_at_once_one_wins(stores):
    uri = stores["s3"].uri()
    results = []
    barrier, refusals_seen = threading.Barrier(4), threading.Event()

    def contend():
        barrier.wait()
        try:
            with bucketlock.held(uri):
                results.append("held")
                refusals_seen.wait(30)  # the winner renews its lease meanwhile
        except ConfigError:
            results.append("refused")
            if results.count("refused") == 3:
                refusals_seen.set()

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["held", "refused", "refused", "refused"]


def test_a_holder_whose_lock_was_taken_over_stops_writing(stores):
    uri = stores["s3"].uri()
    with bucketlock.held(uri) as lock:
        # Another run took it over while this one stalled.
        other = {"holder": "process 9 on elsewhere", "host": "elsewhere", "pid": 9}
        storage.write_bytes(storage.join(uri, bucketlock.LOCK_NAME), json.dumps(other).encode())
        deadline = time.monotonic() + 5
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.lost == "process 9 on elsewhere"
        with pytest.raises(ConfigError, match="was taken over by process 9 on elsewhere"):
            lock.check()
    # Its lock is not released: the new holder's stays.
    assert lock_body(uri)["holder"] == "process 9 on elsewhere"
