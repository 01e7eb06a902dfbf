"""One writer per directory: the exclusive lock a command holds on the
directory it writes into, for as long as it writes there.

The lock is a kernel lock (`flock`) on `<dir>/.mnist-job.lock`: it dies with
its process, so a run killed by SIGKILL or the OOM killer never blocks the
next one. The file names its holder (process id, host, start time),
so a refused run can say who holds the directory. It is removed on release;
a run that finds the file replaced after locking it (its holder released it
meanwhile) locks the new one instead.

On network volumes: NFSv4 and most cluster filesystems pass `flock` to the
server, so it holds across nodes (a replacement pod on another node is
refused while the old one still runs). Where the filesystem has no locks at
all (flock fails with ENOLCK or EOPNOTSUPP, as on some FUSE mounts), the
lock is skipped with a warning: refusing every run there would be worse, and
Kubernetes' `podReplacementPolicy: Failed` already keeps a Job's replacement
pod from starting before the old one has stopped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from job.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".mnist-job.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def held(directory: Path, what: str = "output dir") -> Iterator[None]:
    """Hold `directory` (which must exist) for the block, or raise ConfigError
    (exit 2) at once, naming the holder, if another process holds it."""
    path = Path(directory) / LOCK_NAME
    fd = _acquire(path, what)
    try:
        if fd is not None:
            _describe_holder(fd)
        yield
    finally:
        if fd is not None:
            # Unlink first: a process that opened this file meanwhile sees it
            # gone once it gets the lock, and retries on a new file.
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)


def _acquire(path: Path, what: str) -> int | None:
    """A descriptor of `path` holding its lock, or None where locks don't work."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in _NO_LOCKS:
                log.warning(
                    "%s %s: the filesystem has no locks (%s); not locked against other runs",
                    what,
                    path.parent,
                    err.strerror,
                )
                return None
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            by = f" by {holder}" if holder else " by another process"
            raise ConfigError(
                f"{what} {path.parent} is in use{by}: wait for it to finish, "
                "or choose another directory"
            ) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder released and removed it in between: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _describe_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text = f"process {os.getpid()} on {socket.gethostname()} (since {started})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it: it writes just after it
    locks, so a run that starts at the same moment waits a little for it."""
    for _ in range(10):
        try:
            text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        if text:
            return text
        time.sleep(0.02)
    return ""
