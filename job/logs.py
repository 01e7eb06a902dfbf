"""Log output that fits where the job runs; the CLI calls `configure` once.

- `text`, and `auto` when the log stream is not a terminal (containers,
  Kubernetes, CI): one plain line per message, one per epoch with throughput;
  no control characters.
- `auto` on a terminal: the same lines, plus a progress line for the current
  epoch that is redrawn in place with a carriage return.
- `json`: one JSON object per line, for log aggregators: time, level, logger,
  message and every structured field the message carries.

Code that logs stays plain `logging`: structured fields go in `extra=`, with
`event` naming the kind of record ("start", "epoch", "test", "end"). Records
with event "progress" (epoch, epochs, step, steps, seconds) feed the progress
line only and are dropped by the other formats. `fields()` adds the same
fields to every record of a block: a multi-worker run's task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TIME_FORMAT = "%H:%M:%S"
BAR_WIDTH = 24

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def configure(verbosity: int, log_format: str, stream=None) -> logging.Handler:
    """Send every log record to `stream` (stderr) in `log_format` (auto|text|json)."""
    stream = stream if stream is not None else sys.stderr
    if log_format == "json":
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif log_format == "auto" and _is_terminal(stream):
        handler = ProgressHandler(stream)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TIME_FORMAT))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TIME_FORMAT))
    if not isinstance(handler, ProgressHandler):
        handler.addFilter(lambda record: getattr(record, "event", None) != "progress")
    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # TensorFlow's own INFO lines repeat what the job logs (the strategy), plan
    # every collective (a dozen lines per worker) or name internals (the
    # SavedModel's temporary path): shown with --verbose only.
    # The object stores' clients say at INFO where they found credentials and
    # endpoints, once per client; MLflow (and alembic) each step of a new
    # database's set-up (~80 lines): --verbose only too.
    for name in ("tensorflow", "botocore", "aiobotocore", "s3fs", "gcsfs", "google", "mlflow"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity >= 2 else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.NOTSET if verbosity >= 2 else logging.WARNING)
    # urllib3, under MLflow's client, warns of each retry; the job says what failed.
    logging.getLogger("urllib3").setLevel(logging.NOTSET if verbosity >= 2 else logging.ERROR)
    # When a connection resets, aiohttp (under s3fs and gcsfs) leaves behind a
    # task whose error the client has already retried; asyncio logs it as a
    # traceback. Our own line says what failed and whether it is retried.
    logging.getLogger("asyncio").setLevel(logging.NOTSET if verbosity >= 2 else logging.CRITICAL)
    logging.captureWarnings(True)  # Python warnings too, in the same format
    return handler


def print_error(message: str | None, exc: BaseException | None = None) -> None:
    """The CLI's last words on stderr: `exc`'s traceback and `message` as plain
    lines or, where the log is JSON, as one JSON record (level ERROR)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("job").error(message or "unexpected error", exc_info=exc)
        return
    if exc is not None:
        traceback.print_exception(exc)
    if message:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def fields(**extra) -> Iterator[None]:
    """Inside the block, every record carries `extra` as if each call had passed
    it in `extra=`; JSON lines show it. Workers' lines merged into one stream
    (a log aggregator, `kubectl logs -l`) then still say whose they are."""

    def add_fields(record: logging.LogRecord) -> bool:
        record.__dict__.update(extra)
        return True

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(add_fields)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(add_fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: a stray Path or numpy value must not lose the line.
        return json.dumps(entry, default=str)


class ProgressHandler(logging.StreamHandler):
    """Plain lines, and below them one progress line rewritten in place."""

    def __init__(self, stream):
        super().__init__(stream)
        self._shown = 0  # width of the progress line on screen, 0 if none

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if getattr(record, "event", None) == "progress":
                line = progress_line(record)[: shutil.get_terminal_size().columns - 1]
                # Pad with spaces to cover a longer previous line: no ANSI codes,
                # so it works on any terminal.
                self.stream.write("\r" + line.ljust(self._shown))
                self._shown = len(line)
                self.flush()
                return
            if self._shown:
                self.stream.write("\r" + " " * self._shown + "\r")
                self._shown = 0
            super().emit(record)
        except Exception:
            self.handleError(record)


def progress_line(record: logging.LogRecord) -> str:
    """`epoch 2/5 [#########---------------]  700/1875 steps  0.4 s  56000 images/s`"""
    step, steps = record.step, record.steps
    done = round(BAR_WIDTH * step / steps) if steps else BAR_WIDTH
    bar = "#" * done + "-" * (BAR_WIDTH - done)
    line = f"epoch {record.epoch}/{record.epochs} [{bar}] {step:>{len(str(steps))}}/{steps} steps"
    seconds = getattr(record, "seconds", None)
    if seconds:
        line += f"  {seconds:.1f} s"
        images = getattr(record, "images", 0)
        if images:
            line += f"  {images / seconds:.0f} images/s"
    return line


class Progress:
    """Logs "progress" records for the terminal's progress line: where the
    current epoch is, how long it has run, how many images it has trained."""

    def __init__(self, logger: logging.Logger, epochs: int, steps: int, batch_size: int):
        self._log, self._epochs, self._steps, self._batch = logger, epochs, steps, batch_size
        self._epoch, self._started, self._first_step = None, 0.0, 0

    def update(self, epoch: int, step: int) -> None:
        """`epoch` 0-based (as TrainState counts), `step` within it."""
        if epoch >= self._epochs:
            return
        now = time.perf_counter()
        if epoch != self._epoch:
            self._epoch, self._started, self._first_step = epoch, now, step
        self._log.info(
            "epoch %d/%d: step %d/%d",
            epoch + 1,
            self._epochs,
            step,
            self._steps,
            extra={
                "event": "progress",
                "epoch": epoch + 1,
                "epochs": self._epochs,
                "step": step,
                "steps": self._steps,
                "seconds": now - self._started,
                "images": (step - self._first_step) * self._batch,
            },
        )


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def task_fields(cluster):
    """In a multi-worker run (a job.strategy.Cluster), every log record names its
    worker's task (JSON lines get `task_type` and `task_index`, as in TF_CONFIG)."""
    if not cluster.is_multi_worker:
        return contextlib.nullcontext()
    return fields(task_type=cluster.task_type, task_index=cluster.task_index)
