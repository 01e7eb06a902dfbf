"""XLA's persistent compilation cache, made safe to share between runs.

TensorFlow can save each program XLA compiles and load it in a later process
(TF_XLA_FLAGS=--tf_xla_persistent_cache_directory): a repeat of the seed's run
skips ~0.35 s of its ~0.65 s first-call cost and ~80 MB of peak memory. Pointed
at a shared directory, TensorFlow 2.21's cache is fragile:

- an entry it cannot read (truncated or damaged on disk) fails the run
  (`OutOfRangeError`), and every later run, until someone deletes it;
- it fails the run on any error writing the directory (read-only, full);
- an entry's key is the program alone, not the CPU it was compiled for nor
  XLA's flags: one compiled for a CPU with AVX-512 would run on one without.

So TensorFlow only ever sees a private directory of this process, in the
system's temporary directory, and the shared cache is kept by us:

- entries live in `<cache>/tf<version>-<hash of CPU and XLA flags>/`, named
  `<TensorFlow's name>.<SHA-256 of the content>.pb`; nothing else in `<cache>`
  is ever read or deleted;
- before training, every shared entry whose content matches its name is
  linked into the private directory under TensorFlow's name;
- after training, the entries TensorFlow wrote there (programs it had to
  compile) are published: written beside their final name, then renamed;
  beyond MAX_CACHE_BYTES, the entries offered least recently are deleted;
- a cache that cannot be read or written is logged and left out; it never
  fails a run.

TensorFlow reads its flags once per process, so the private directory is one
per process; each run in it (the tests run many) starts it empty again. Its
name holds the host and process id: a killed process cannot remove it, the
next run on the same host does.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from job import artifacts

log = logging.getLogger(__name__)

FLAG = "--tf_xla_persistent_cache_directory"

# The entries offered least recently go beyond this. The seed's step is ~0.3 MB,
# and a sweep over shapes or flags adds one entry per program; every run reads
# and hashes them all (~40 ms for 64 MB).
MAX_CACHE_BYTES = 64 * 2**20
# Free space the private directory needs: a program of the seed's size is ~0.3 MB.
MIN_FREE_BYTES = 16 * 2**20

# What we write, and so all we ever read or delete, under the cache dir.
KEY_DIR = re.compile(r"tf[^/]+-[0-9a-f]{16}")
ENTRY = re.compile(r"(?P<name>.+)\.(?P<digest>[0-9a-f]{64})\.pb")

# /proc/cpuinfo lines that say which instructions a compiled program may use
# (x86: model name, flags; ARM: Features, CPU implementer/architecture/part).
CPU_FIELDS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU part")

# The private directory TensorFlow was pointed at; None until the first run.
# Its name holds the host and process id, so that a later run can tell it is
# orphaned: mnist-job-xla-<host>-<pid>-<random>.
PRIVATE_PREFIX = "mnist-job-xla-"
_private: Path | None = None


@contextlib.contextmanager
def binding(enabled: bool = True) -> Iterator[None]:
    """Point TensorFlow at this process's private cache directory while it
    sets up inside the block.

    TensorFlow reads TF_XLA_FLAGS when its context starts, after which the
    variable is put back as it was: child processes must not inherit a
    directory that is ours. Once per process (a context started before the
    first run never reads it, and the cache stays unused); not at all for a
    directory of the user's own in TF_XLA_FLAGS, which is left alone.
    """
    global _private
    flags = os.environ.get("TF_XLA_FLAGS")
    if not enabled or _private is not None or FLAG in (flags or ""):
        yield
        return
    tmp = Path(tempfile.gettempdir())
    try:
        if '"' in str(tmp):  # TensorFlow's flag parser could not quote it
            raise OSError(f'a " in the path {tmp}')
        # TensorFlow fails the run if it cannot write an entry there.
        if shutil.disk_usage(tmp).free < MIN_FREE_BYTES:
            raise OSError(f"less than {MIN_FREE_BYTES // 2**20} MB free")
        _remove_orphans(tmp)
        prefix = f"{PRIVATE_PREFIX}{_host()}-{os.getpid()}-"
        _private = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    except OSError as err:
        log.info("XLA compile cache off: cannot use %s (%s)", tmp, err)
        yield
        return
    # A run that fails before training leaves it behind otherwise.
    atexit.register(shutil.rmtree, _private, ignore_errors=True)
    # Quoted: TensorFlow splits its flags at spaces.
    os.environ["TF_XLA_FLAGS"] = f'{flags or ""} {FLAG}="{_private}"'.strip()
    try:
        yield
        import tensorflow as tf

        tf.constant(0)  # starts the context, which reads the flags
    finally:
        if flags is None:
            del os.environ["TF_XLA_FLAGS"]
        else:
            os.environ["TF_XLA_FLAGS"] = flags


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def _remove_orphans(tmp: Path) -> None:
    """Private directories of this host's processes that were killed (SIGKILL,
    OOM). Another host's (a /tmp shared between containers, whose process ids
    mean nothing here) are left alone."""
    for orphan in tmp.glob(f"{PRIVATE_PREFIX}{_host()}-*-*"):
        pid = orphan.name.rsplit("-", 2)[1]
        try:
            ours = pid.isdigit() and orphan.stat().st_uid == os.getuid()
        except OSError:  # gone meanwhile
            continue
        if ours and not artifacts.process_running(int(pid)):
            shutil.rmtree(orphan, ignore_errors=True)


def machine_key(deterministic: bool) -> str:
    """What an executable compiled here depends on besides its program."""
    import tensorflow as tf

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    cpu = {}
    for line in cpuinfo:
        field, _, value = line.partition(":")
        if field.strip() in CPU_FIELDS:
            cpu.setdefault(field.strip(), value.strip())  # the first core's
    parts = [
        platform.machine(),
        *(f"{field}={value}" for field, value in sorted(cpu.items())),
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("TF_XLA_FLAGS", ""),
        f"deterministic={deterministic}",
    ]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"tf{tf.__version__}-{digest}"


@contextlib.contextmanager
def offered(root: Path | None, deterministic: bool) -> Iterator[None]:
    """Offer the shared entries under `root` (None: no cache) to the XLA
    compiles inside the block, and share what they add."""
    private = _private
    if private is None:  # TensorFlow is not reading our directory
        yield
        return
    shared = _open(root, deterministic, private) if root is not None else None
    try:
        yield
    finally:
        if shared is not None:
            published = _publish_all(private, shared)
            log.debug("XLA compile cache %s: %d new entries", shared, published)
            if published:
                _evict(root, MAX_CACHE_BYTES)
        # Gone until the next run; TensorFlow recreates it if it compiles more.
        shutil.rmtree(private, ignore_errors=True)


def _open(root: Path, deterministic: bool, private: Path) -> Path | None:
    """Link the shared entries into the private directory, emptied; None if
    the cache cannot be used."""
    shared = root / machine_key(deterministic)
    try:
        _empty(private)
        shared.mkdir(parents=True, exist_ok=True)
        linked = sum(_link(entry, private) for entry in shared.glob("*.pb"))
    except OSError as err:
        log.warning("XLA compile cache %s unusable, compiling without it: %s", shared, err)
        return None
    log.debug("XLA compile cache %s: %d entries", shared, linked)
    return shared


def _empty(private: Path) -> None:
    """Our private directory, empty: made anew (only by us, only for us) if an
    earlier run in this process removed it."""
    if not private.exists():
        private.mkdir(mode=0o700)  # FileExistsError if someone raced us to it
    if private.is_symlink() or private.stat().st_uid != os.getuid():
        raise OSError(f"{private} is not ours")
    for child in private.iterdir():
        child.unlink()


def _publish_all(private: Path, shared: Path) -> int:
    """Share the entries TensorFlow wrote (not the links we made); how many."""
    published = 0
    try:
        for entry in private.glob("*.pb"):
            if not entry.is_symlink():
                published += _publish(entry, shared)
    except OSError as err:
        log.warning("XLA compile cache %s: could not save an entry: %s", shared, err)
    return published


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _link(entry: Path, private: Path) -> bool:
    """Offer a shared entry to TensorFlow if its content is what its name says."""
    match = ENTRY.fullmatch(entry.name)
    if match is None:  # not ours
        return False
    try:
        intact = _digest(entry) == match["digest"]
    except OSError as err:  # another user's, unreadable: the others still serve
        log.debug("XLA compile cache: skipping %s (%s)", entry, err)
        return False
    if not intact:
        # Entries appear by rename, complete: this one was damaged since.
        log.warning("XLA compile cache: deleting %s, which is damaged", entry)
        with contextlib.suppress(OSError):  # a read-only cache: the others still serve
            entry.unlink(missing_ok=True)
        return False
    link = private / f"{match['name']}.pb"
    if link.is_symlink():  # another copy of the same program: one is enough
        return False
    link.symlink_to(entry.resolve())
    with contextlib.suppress(OSError):  # a read-only cache is still a cache
        os.utime(entry)  # offered now: the last to be evicted
    return True


def entries(root: Path) -> list[Path]:
    """The cache's own entries under `root`, and nothing else that lives there."""
    if not root.is_dir():
        return []
    return [
        entry
        for key in root.iterdir()
        if KEY_DIR.fullmatch(key.name) and key.is_dir()
        for entry in key.iterdir()
        if ENTRY.fullmatch(entry.name)
    ]


def _evict(root: Path, max_bytes: int) -> None:
    """Delete the entries offered least recently until the cache fits."""
    try:
        stats = sorted(
            ((entry.stat(), entry) for entry in entries(root)),
            key=lambda stat_entry: stat_entry[0].st_mtime,
        )
        total = sum(stat.st_size for stat, _ in stats)
        for stat, entry in stats:
            if total <= max_bytes:
                break
            entry.unlink(missing_ok=True)
            total -= stat.st_size
    except OSError as err:
        log.warning("XLA compile cache %s: could not evict old entries: %s", root, err)


def _publish(entry: Path, shared: Path) -> bool:
    program = entry.read_bytes()
    target = shared / f"{entry.stem}.{hashlib.sha256(program).hexdigest()}.pb"
    if target.exists():  # another process published the same program
        return False
    artifacts.write_bytes(target, program)  # readable by other users of the cache, as any file
    return True
