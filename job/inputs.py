"""Models and MNIST read from a local path or from `gs://` / `s3://` (job/storage.py).

A model or MNIST in a bucket is copied into a temporary local dir, used from
there, and the copy deleted: Keras and job/data.py read local files, and the
checks they make (a complete .keras zip, MNIST's content hash) then apply to
what came from the bucket as they do on disk. A bucket used as `--data-dir`
is a cache like a local one: a run that has to fetch MNIST puts the verified
file there, so later runs and other workers read it from the bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from job import data, storage
from job.config import MODEL_FILENAME
from job.errors import ConfigError, DataError, JobError
from job.model import load_model as load_local_model
from job.model import model_file

log = logging.getLogger(__name__)


def model_location(model: Path | str) -> Path | str:
    """A model.keras file, or an output dir holding one (a path or a URI) ->
    the model file's path or URI."""
    if not storage.is_uri(model):
        return model_file(model)
    if model.endswith(".keras"):
        return model
    fs = storage.filesystem(model)
    try:
        is_file = storage.call("read", model, lambda: fs.isfile(model))
    except FileNotFoundError:
        is_file = False
    return model if is_file else storage.join(model, MODEL_FILENAME)


def parent(location: Path | str) -> Path | str:
    """The dir (or prefix) that holds a file or object."""
    return location.rsplit("/", 1)[0] if storage.is_uri(location) else Path(location).parent


def load_model(model: Path | str):
    """job.model.load_model for a path or a URI; errors name what the user passed."""
    target = model_location(model)
    if not storage.is_uri(target):
        return load_local_model(target)
    with tempfile.TemporaryDirectory(prefix="mnist-job-model-") as tmp:
        local = Path(tmp) / MODEL_FILENAME  # Keras picks the format by this suffix
        if not storage.download(target, local):
            raise ConfigError(
                f"no model at {target}: pass --model a model.keras object or an output dir "
                "of `mnist-job train`"
            )
        with _named(local, target):
            return load_local_model(local)


def data_file(data_dir: Path | str) -> Path | str:
    """Where the MNIST file of a data dir (or bucket prefix) is."""
    if storage.is_uri(data_dir):
        return storage.join(data_dir, data.MNIST_FILENAME)
    return Path(data_dir) / data.MNIST_FILENAME


def load_data(data_dir: Path | str, source: data.MnistSource = data.DEFAULT_SOURCE) -> data.Mnist:
    """data.load, for a data dir that may be a bucket prefix: what had to be
    fetched is kept there too (a warning, not a failure, if it cannot be)."""
    if not storage.is_uri(data_dir):
        return data.load(data_dir, source=source)
    with _bucket_cache(data_dir, source) as (local, keep):
        mnist = data.load(local, source=source)
        try:
            keep()
        except (ConfigError, JobError) as err:
            log.warning("MNIST was fetched for this run only: %s", err)
        return mnist


def fetch_data(data_dir: Path | str, source: data.MnistSource = data.DEFAULT_SOURCE) -> Path | str:
    """data.fetch, for a data dir that may be a bucket prefix."""
    if not storage.is_uri(data_dir):
        return data.fetch(data_dir, source=source)
    with _bucket_cache(data_dir, source) as (local, keep):
        data.fetch(local, source=source)
        keep()
    return data_file(data_dir)


def verify_data(data_dir: Path | str, source: data.MnistSource = data.DEFAULT_SOURCE) -> Path | str:
    """data.verify, for a data dir that may be a bucket prefix. Never fetches."""
    if not storage.is_uri(data_dir):
        return data.verify(data_dir, source=source)
    with _bucket_cache(data_dir, source) as (local, _keep):
        data.verify(local, source=source)
    return data_file(data_dir)


@contextlib.contextmanager
def _bucket_cache(uri: str, source: data.MnistSource) -> Iterator[tuple[Path, object]]:
    """A temporary local data dir holding the bucket's MNIST file (or, where
    there is none, a wheel placed there for offline installs), and `keep()`,
    which uploads the local file if it is not the one downloaded. DataErrors
    raised inside name the bucket, not the temporary dir."""
    npz_uri = data_file(uri)
    with tempfile.TemporaryDirectory(prefix="mnist-job-data-") as tmp:
        local = Path(tmp)
        npz = local / data.MNIST_FILENAME
        downloaded = _identity(npz) if storage.download(npz_uri, npz) else None
        if downloaded is None:
            wheel = source.wheel_filename
            storage.download(storage.join(uri, wheel), local / wheel)

        def keep() -> None:
            if npz.is_file() and _identity(npz) != downloaded:
                storage.upload(npz, npz_uri)
                log.info("MNIST saved to %s", npz_uri)

        with _named(local, uri):
            yield local, keep


def _identity(path: Path) -> tuple[int, int]:
    """Changes when the file is replaced (data.py replaces files whole)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns


@contextlib.contextmanager
def _named(local: Path, shown: str) -> Iterator[None]:
    """Errors that name the temporary copy name the bucket's object instead."""
    try:
        yield
    except (ConfigError, DataError) as err:
        raise type(err)(str(err).replace(str(local), shown)) from None
