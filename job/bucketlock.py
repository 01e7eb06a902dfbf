"""One writer per output dir in a bucket: a lease held through the stores'
conditional writes.

The lock is the object `<dir>/.mnist-job.lock`, naming its holder. A run
creates it only if there is none (S3 `If-None-Match: *`, GCS
`ifGenerationMatch=0`) and renews it every HEARTBEAT_SECONDS, each time only if
it is still the version it wrote (S3 `If-Match`, GCS `ifGenerationMatch`).
Unlike a kernel lock, it does not die with its process: a run that finds the
lock watches it, and takes it over (again conditionally, so that of two runs
doing so at once only one wins) when its holder is a process of this host
that no longer runs, or when it went LEASE_SECONDS without a renewal. A
replacement pod therefore waits at most LEASE_SECONDS for a killed one's lock.

Guaranteed: while a holder renews its lease, no other run gets the lock, and
a holder whose lock was taken over (it stalled past the lease) learns it at
its next renewal and stops before it writes another object. Not guaranteed:
a holder that stalls past the lease keeps writing until that next renewal.

The conditional writes use the stores' own clients (botocore, the one s3fs
runs on, and google-cloud-storage, which gcsfs installs), since fsspec exposes
create-only writes but not replace-if-unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from job import storage
from job.artifacts import process_running
from job.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".mnist-job.lock"
LEASE_SECONDS = 30.0
HEARTBEAT_SECONDS = LEASE_SECONDS / 3


class Lock:
    """The lock object of one dir; `lost` names who took it over, if anyone."""

    def __init__(self, dir_uri: str, what: str):
        self.uri = storage.join(dir_uri, LOCK_NAME)
        self.what, self.dir_uri = what, dir_uri
        storage.filesystem(self.uri)  # a ConfigError naming the extra if it is missing
        self.store = _store(self.uri)
        self.version = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewals = 0
        self._since = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def _body(self) -> bytes:
        self._renewals += 1  # every renewal is a new version (S3's ETag is the content's MD5)
        return json.dumps(
            {
                "holder": f"process {os.getpid()} on {socket.gethostname()} (since {self._since})",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewal": self._renewals,
                "renewed": time.time(),
            }
        ).encode()

    def acquire(self) -> None:
        """Hold the lock, or raise ConfigError (exit 2) naming its live holder."""
        while True:
            seen = self._call("read", self.store.read)
            if seen is None:
                self.version = self._call("create", lambda: self.store.create(self._body()))
                if self.version is not None:
                    return
                continue  # another run created it just now: look at theirs
            body, version = seen
            state = self._watch(body, version)
            if state == "released":
                continue
            if state == "alive":
                raise self._in_use(body)
            self.version = self._call(
                "take over", lambda seen=version: self.store.replace(self._body(), seen)
            )
            if self.version is None:
                raise self._in_use(body)  # another run took it over first
            log.warning("%s %s: took over the lock of %s", self.what, self.dir_uri, _holder(body))
            return

    def _watch(self, body: bytes, version) -> str:
        """'alive', 'released' or 'abandoned': a live holder renews its lease."""
        holder = _parse(body)
        pid = holder.get("pid")
        here = holder.get("host") == socket.gethostname() and isinstance(pid, int)
        if here and not process_running(pid):
            return "abandoned"
        log.info(
            "%s %s is locked by %s: waiting up to %.0f s to see whether it is still alive",
            self.what,
            self.dir_uri,
            _holder(body),
            LEASE_SECONDS,
        )
        deadline = time.monotonic() + LEASE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(1.0)
            seen = self._call("read", self.store.read)
            if seen is None:
                return "released"
            if seen != (body, version):  # every renewal writes a new body
                return "alive"
        return "abandoned"

    def renew_until_released(self) -> None:
        """The heartbeat (in a thread): renew every HEARTBEAT_SECONDS."""
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                version = self.store.replace(self._body(), self.version)
            except Exception as err:  # the network: the next renewal may get through
                log.warning("could not renew the lock %s (%s)", self.uri, storage.describe(err))
                continue
            if version is None:
                seen = _safely(self.store.read)
                self.lost = _holder(seen[0]) if seen else "another run"
                log.error(
                    "%s %s: the lock was taken over by %s", self.what, self.dir_uri, self.lost
                )
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self.lost is None and self.version is not None:
            with contextlib.suppress(Exception):  # a lease left behind expires by itself
                self.store.delete(self.version)

    def check(self) -> None:
        """Raise ConfigError if another run took the lock over."""
        if self.lost:
            raise ConfigError(
                f"{self.what} {self.dir_uri} was taken over by {self.lost} while this run "
                "stalled: stopping without writing more"
            )

    def _in_use(self, body: bytes) -> ConfigError:
        return ConfigError(
            f"{self.what} {self.dir_uri} is in use by {_holder(body)}: wait for it to "
            "finish, or choose another directory"
        )

    def _call(self, what: str, operation):
        try:
            return storage.call(f"{what} the lock", self.uri, operation)
        except FileNotFoundError:
            raise storage.missing_bucket(self.dir_uri) from None


@contextlib.contextmanager
def held(dir_uri: str, what: str = "output dir") -> Iterator[Lock]:
    """Hold the lock of `dir_uri` for the block (renewed in a thread)."""
    lock = Lock(dir_uri, what)
    lock.acquire()
    heartbeat = threading.Thread(target=lock.renew_until_released, daemon=True)
    heartbeat.start()
    try:
        yield lock
    finally:
        lock.release()
        heartbeat.join(timeout=5)


def _parse(body: bytes) -> dict:
    try:
        holder = json.loads(body)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder(body: bytes) -> str:
    return str(_parse(body).get("holder") or "another run")


def _safely(operation):
    try:
        return operation()
    except Exception:
        return None


def _store(uri: str):
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return _S3Object(bucket, key) if uri.startswith("s3://") else _GCSObject(bucket, key)


class _S3Object:
    """Conditional writes of one S3 object through botocore."""

    def __init__(self, bucket: str, key: str):
        import botocore.session

        self.bucket, self.key = bucket, key
        self.client = botocore.session.get_session().create_client("s3")

    def read(self):
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as err:
            raise _s3_error(err) from None
        return got["Body"].read(), got["ETag"]

    def create(self, body: bytes):
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version):
        return self._put(body, IfMatch=version)

    def _put(self, body: bytes, **condition):
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)[
                "ETag"
            ]
        except Exception as err:
            if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return None
            raise _s3_error(err) from None

    def delete(self, version) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


def _s3_code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def _s3_error(err: Exception) -> Exception:
    """botocore's errors as storage.call classifies them."""
    code = _s3_code(err)
    if code in ("NoSuchBucket", "404"):
        return FileNotFoundError(str(err))
    if code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "ExpiredToken",
        "SignatureDoesNotMatch",
        "403",
    ):
        return PermissionError(str(err))
    return err


class _GCSObject:
    """Conditional writes of one GCS object through google-cloud-storage."""

    def __init__(self, bucket: str, key: str):
        from google.api_core import exceptions
        from google.cloud import storage as gcs

        self.exceptions = exceptions
        self.bucket = gcs.Client().bucket(bucket)
        self.key = key

    def read(self):
        try:
            blob = self.bucket.get_blob(self.key)
            if blob is None:
                return None
            return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
        except self.exceptions.NotFound as err:
            if "bucket" in str(err).lower():
                raise FileNotFoundError(str(err)) from None
            return None
        except self.exceptions.PreconditionFailed:
            return self.read()  # renewed between the two requests

    def create(self, body: bytes):
        return self._upload(body, 0)

    def replace(self, body: bytes, version):
        return self._upload(body, version)

    def _upload(self, body: bytes, generation):
        blob = self.bucket.blob(self.key)
        try:
            blob.upload_from_string(body, if_generation_match=generation)
        except self.exceptions.PreconditionFailed:
            return None
        except self.exceptions.NotFound as err:
            raise FileNotFoundError(str(err)) from None
        return blob.generation

    def delete(self, version) -> None:
        with contextlib.suppress(self.exceptions.NotFound, self.exceptions.PreconditionFailed):
            self.bucket.blob(self.key).delete(if_generation_match=version)
