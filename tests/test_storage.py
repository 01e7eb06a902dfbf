"""Object storage through the clients, against the local S3 and GCS servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from job import storage
from job.errors import ConfigError, JobError
from tests.stores import moto_server


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("outputs", Path("outputs")),
        ("s3://bucket/run/", "s3://bucket/run"),
        ("gs://bucket", "gs://bucket"),
        ("/gcs/bucket/run", "gs://bucket/run"),  # Vertex AI's FUSE mount
        (Path("/tmp/x"), Path("/tmp/x")),
    ],
)
def test_locations(given, expected):
    assert storage.location(given) == expected


def test_files_and_trees_round_trip(store, tmp_path):
    uri = store.uri()
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "a.txt").write_text("a")
    (tmp_path / "up" / "sub" / "b.txt").write_text("b")
    assert storage.upload_tree(tmp_path / "up", uri) == 2
    assert storage.exists(storage.join(uri, "sub", "b.txt"))
    assert storage.read_bytes(storage.join(uri, "a.txt")) == b"a"
    assert storage.read_bytes(storage.join(uri, "none")) is None
    assert storage.download_tree(uri, tmp_path / "down") == 2
    assert (tmp_path / "down" / "sub" / "b.txt").read_text() == "b"
    assert not storage.download(storage.join(uri, "none"), tmp_path / "none")

    storage.delete(uri)
    assert not storage.exists(storage.join(uri, "a.txt"))
    storage.delete(uri)  # nothing left: no error


def test_a_missing_bucket_is_a_usage_error(store):
    uri = f"{store.scheme}://no-such-bucket-here/run"
    assert not storage.exists(storage.join(uri, "metrics.json"))
    with pytest.raises(ConfigError, match=r"no-such-bucket-here.*is not writable.*no such bucket"):
        storage.check_writable(uri, "output dir")


def test_refused_credentials_are_a_usage_error(stores, monkeypatch):
    """A store that refuses these credentials (403) is refused at once, not retried."""
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        try:
            with pytest.raises(ConfigError, match="access denied"):
                storage.check_writable("s3://any-bucket/run", "output dir")
        finally:
            fsspec.filesystem("s3").clear_instance_cache()


def test_a_failing_network_is_retried_then_a_retryable_error(monkeypatch, stores):
    """Nothing listens at the endpoint: retried with backoff, then exit 1."""
    import fsspec

    from tests.stores import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        with pytest.raises(JobError, match=r"could not write s3://b/x after \d+ tries"):
            storage.write_bytes("s3://b/x", b"x")
    finally:
        fsspec.filesystem("s3").clear_instance_cache()


def test_a_bad_retry_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "soon")
    with pytest.raises(ConfigError, match="not a number of seconds"):
        storage.retry_seconds()
