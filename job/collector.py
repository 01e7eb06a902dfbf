"""Python's cycle collector, paused while TensorFlow and Keras start up.

Importing TensorFlow and Keras and building or loading a model create
~500,000 objects that live as long as the process. Each automatic full
collection walks all of them again and frees nothing: on 2 cores that cost
`train` 0.5 s of start-up and 0.15 s of writing artifacts, and `evaluate` and
`predict` about 0.3 s each (of 3.5 s and 3 s).

The price: garbage cycles made during start-up are frozen too, never freed.
TensorFlow's import makes one that holds the frames importing it, with their
locals; runner.run imports it before any of its callees holds data.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def paused() -> Iterator[Callable[[], None]]:
    """Collector off inside the block; yields `startup_done`.

    `startup_done()` freezes every object that exists by then (later
    collections skip them) and turns the collector back on, for whatever a long
    run creates afterwards. On the way out the collector is as it was and the
    frozen objects are unfrozen, so that a process running several jobs (the
    tests) can still collect them.
    """
    was_enabled = gc.isenabled()
    gc.disable()

    def startup_done() -> None:
        gc.freeze()
        if was_enabled:
            gc.enable()

    try:
        yield startup_done
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
