"""What SIGTERM (Kubernetes eviction, Kueue preemption, `docker stop`) does
during a run.

Until `catch()` it ends the process at once: set-up (importing TensorFlow,
fetching MNIST) has nothing to lose and need not finish first. From then on
it only sets a flag: training checkpoints at the end of the current chunk and
stops with exit 143; once training is done the run finishes writing its
artifacts, which takes about a second, rather than leave them half made.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Sigterm:
    def __init__(self):
        self._received = False

    def catch(self) -> None:
        signal.signal(signal.SIGTERM, self._receive)

    def received(self) -> bool:
        return self._received

    def _receive(self, signum, frame) -> None:
        self._received = True


@contextlib.contextmanager
def handled() -> Iterator[Sigterm]:
    """SIGTERM ends the process until `catch()`; on exit, the handler is put back."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield Sigterm()
    finally:
        signal.signal(signal.SIGTERM, previous)


def reclaim() -> None:
    """Take SIGTERM back from TensorFlow's runtime: MultiWorkerMirroredStrategy
    installs its own handler (for preemption notices), which swallows the
    signal before Python sees it."""
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
