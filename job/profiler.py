"""`--profile-steps FIRST,LAST`: TensorFlow's profiler trace of those training
steps, for TensorBoard's Profile tab.

Steps are global and 1-based, as TensorBoard's `batch_loss` counts them. The
loop runs steps in compiled chunks, and a trace can only start or stop between
chunks: so chunks also end before FIRST and after LAST (`breaks`), and the
trace holds exactly those steps. It is written where TensorBoard's profile
plugin looks: `<tensorboard dir>/train/plugins/profile/<timestamp>/`, the
`train` run, as Keras' TensorBoard callback writes it. Off, nothing of the
profiler is imported and no chunk is cut.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class StepProfiler:
    """Traces steps `first` to `last` of a run into `log_dir`; with no steps
    (or no log dir, as on a worker that is not the chief), does nothing."""

    def __init__(self, steps: tuple[int, int] | None, log_dir: Path | None):
        self.steps = steps if log_dir is not None else None
        self.log_dir = log_dir
        self._tracing = False
        self._traced = [0, 0]  # global steps after which the trace started, and reached

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()  # a run stopped early still gets the trace of what ran

    @property
    def breaks(self) -> tuple[int, ...]:
        """Global steps after which a chunk must end."""
        if self.steps is None:
            return ()
        first, last = self.steps
        return (first - 1, last)

    def chunk_starting(self, global_step: int) -> None:
        """Start the trace if the chunk after `global_step` is in the range
        (also when a resumed run starts inside it)."""
        if self.steps is None or self._tracing:
            return
        first, last = self.steps
        if first - 1 <= global_step < last:
            import tensorflow as tf

            try:
                tf.profiler.experimental.start(str(self.log_dir))
            except tf.errors.AlreadyExistsError:
                log.warning("not profiling: another profiler session is running")
                self.steps = None
                return
            self._tracing, self._traced = True, [global_step, global_step]

    def chunk_ended(self, global_step: int) -> None:
        if self._tracing:
            self._traced[1] = global_step
            if global_step >= self.steps[1]:
                self.stop()

    def stop(self) -> None:
        """Write the trace of what ran so far; nothing if not tracing."""
        if not self._tracing:
            return
        import tensorflow as tf

        self._tracing, self.steps = False, None  # once per run
        tf.profiler.experimental.stop()
        after, reached = self._traced
        where = self.log_dir / "plugins" / "profile"
        if reached > after:
            log.info("Profiled steps %d-%d into %s", after + 1, reached, where)
