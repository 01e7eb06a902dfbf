"""Object storage: `gs://bucket/path` and `s3://bucket/path`, read and written
through fsspec's gcsfs and s3fs.

Credentials come from the clients' own chains (environment, workload identity,
instance roles); endpoints from their standard variables (`AWS_ENDPOINT_URL`,
`STORAGE_EMULATOR_HOST`), so S3-compatible stores and emulators work as the
clouds do. An upload is one PUT per file, which replaces an object whole:
every object appears complete or not at all, so no temporary names are needed.

Failures: a refusal (403, no such bucket, no or expired credentials) is a
ConfigError (exit 2: a retry would be refused the same way); anything else
(the network, a 5xx, a timeout) is retried with backoff for up to
`MNIST_JOB_STORAGE_RETRY_SECONDS` (default 120), then a JobError (exit 1, which
Kubernetes retries).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from job.errors import ConfigError, JobError

log = logging.getLogger(__name__)

# gcsfs otherwise probes every bucket for zonal and hierarchical-namespace
# features with a gRPC client, and logs a warning per bucket when that fails.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

SCHEMES = ("gs", "s3")
# Vertex AI mounts buckets here with Cloud Storage FUSE, which renames by copy
# and delete: such paths are written through the GCS API instead.
GCS_FUSE_ROOT = "/gcs/"
RETRY_SECONDS_ENV = "MNIST_JOB_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
MAX_BACKOFF_SECONDS = 30.0

T = TypeVar("T")


def is_uri(value) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0] in SCHEMES and "://" in value


def location(value: str | Path) -> str | Path:
    """A local path as a Path; a bucket URI (or a Vertex AI /gcs/ path) as a
    normalised `scheme://bucket/path` string. Raises ConfigError for a URI of
    another scheme or without a bucket."""
    text = str(value)
    if text.startswith(GCS_FUSE_ROOT):
        text = "gs://" + text[len(GCS_FUSE_ROOT) :]
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Path(value)
    if scheme not in SCHEMES:
        raise ConfigError(f"{text}: only local paths, gs:// and s3:// are supported")
    if not rest.split("/", 1)[0]:
        raise ConfigError(f"{text}: no bucket name")
    return f"{scheme}://{rest.strip('/')}"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str):
    """The fsspec filesystem for `uri`'s scheme (one instance per process)."""
    try:
        import fsspec

        return fsspec.filesystem(uri.split("://", 1)[0])
    except ImportError as err:
        raise ConfigError(
            f"{uri}: object storage needs the cloud clients ({err.name} is missing): "
            "pip install 'mnist-job[cloud]'"
        ) from None


def retry_seconds() -> float:
    value = os.environ.get(RETRY_SECONDS_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise ConfigError(f"{RETRY_SECONDS_ENV}={value!r} is not a number of seconds") from None
    return max(0.0, seconds)


def call(what: str, uri: str, operation: Callable[[], T]) -> T:
    """`operation()`, retried with backoff while the store fails in a way a
    retry may cure. `what` and `uri` name it in the one-line errors."""
    deadline = time.monotonic() + retry_seconds()
    delay, tries = 1.0, 0
    while True:
        tries += 1
        try:
            return operation()
        except FileNotFoundError:
            raise  # for the caller: no such object (a missing bucket, when writing)
        except Exception as err:
            reason = describe(err)
            if refused(err):
                raise ConfigError(f"cannot {what} {uri}: {reason}") from None
            if time.monotonic() + delay > deadline:
                raise JobError(
                    f"could not {what} {uri} after {tries} tries ({reason}); "
                    "the store or the network keeps failing"
                ) from None
            log.warning("%s %s failed (%s): retrying in %.0f s", what, uri, reason, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)


def refused(err: BaseException) -> bool:
    """Whether the store refused for good: retrying would be refused again."""
    if isinstance(err, PermissionError | ValueError | ConfigError):
        return True
    if str(err).startswith("Forbidden"):  # gcsfs' 403
        return True
    if getattr(err, "code", None) in (401, 403):  # gcsfs' HttpError
        return True
    kind = type(err).__name__
    # botocore's and google-auth's credential errors, without importing either.
    return kind in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "DefaultCredentialsError",
        "RefreshError",
    )


def describe(err: BaseException) -> str:
    """One line: the store's own message, without its multi-line details."""
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    if isinstance(err, PermissionError):
        return f"access denied ({first})"
    return first if len(first) < 300 else first[:297] + "..."


def missing_bucket(uri: str) -> ConfigError:
    return ConfigError(f"{uri}: no such bucket, or no access to it")


def exists(uri: str) -> bool:
    fs = filesystem(uri)
    try:
        return call("read", uri, lambda: fs.exists(uri))
    except FileNotFoundError:
        return False


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    fs = filesystem(uri)
    try:
        return call("read", uri, lambda: fs.cat_file(uri))
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    fs = filesystem(uri)
    try:
        call("write", uri, lambda: fs.pipe_file(uri, data))
    except FileNotFoundError:
        raise missing_bucket(uri) from None


def upload(local: Path, uri: str) -> None:
    """One file to one object."""
    fs = filesystem(uri)
    try:
        call("upload to", uri, lambda: fs.put_file(str(local), uri))
    except FileNotFoundError:
        if not local.exists():
            raise
        raise missing_bucket(uri) from None
    finally:
        fs.invalidate_cache(uri)


def upload_tree(local_dir: Path, uri: str, skip: Callable[[Path], bool] = lambda _: False) -> int:
    """Every file under `local_dir` to the same relative key under `uri`,
    except those `skip` names; the number uploaded."""
    count = 0
    for path in sorted(files_under(local_dir)):
        if not skip(path):
            upload(path, join(uri, path.relative_to(local_dir).as_posix()))
            count += 1
    return count


def files_under(local_dir: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(local_dir):
        for name in names:
            yield Path(root) / name


def download(uri: str, local: Path) -> bool:
    """One object to a local file, replaced whole; False if there is none."""
    from job.artifacts import atomic_path

    fs = filesystem(uri)
    try:
        with atomic_path(local) as tmp:
            call("download", uri, lambda: fs.get_file(uri, str(tmp)))
    except FileNotFoundError:
        return False
    return True


def download_tree(uri: str, local_dir: Path) -> int:
    """Every object under `uri` to the same relative path under `local_dir`;
    the number downloaded (0 if there are none)."""
    fs = filesystem(uri)
    root = uri.split("://", 1)[1].rstrip("/")
    try:
        keys = call("list", uri, lambda: fs.find(uri))
    except FileNotFoundError:
        return 0
    for key in keys:
        download(f"{uri.split('://', 1)[0]}://{key}", local_dir / key[len(root) + 1 :])
    return len(keys)


def delete(uri: str) -> None:
    """The object `uri` and everything under it as a prefix; none is fine."""
    fs = filesystem(uri)
    try:
        keys = call("list", uri, lambda: fs.find(uri, withdirs=False))
        if fs.isfile(uri):
            keys = [*keys, uri]
        if keys:
            call("delete", uri, lambda: fs.rm(sorted(set(keys))))
    except FileNotFoundError:
        pass
    finally:
        fs.invalidate_cache(uri)


def check_writable(uri: str, what: str) -> None:
    """Fail early, before any training, if `uri` cannot take objects: writes
    and deletes a small probe object under it."""
    probe = join(uri, ".mnist-job-probe")
    try:
        write_bytes(probe, b"")
    except ConfigError as err:
        raise ConfigError(f"{what} {uri} is not writable: {err}") from None
    delete(probe)
