"""TensorFlow's C++ log lines on stderr, kept to the ones a user must see.

TensorFlow 2.21 writes to file descriptor 2 from C++, whatever
TF_CPP_MIN_LOG_LEVEL says: absl's `WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR`, an `I0000` notice
about the CPU (oneDNN's or the CPU feature guard's), and on every run that
loads a compiled step from the compile cache `E0000` lines that are harmless
(on some CPUs one says "SIGILL"). Alerting fires on `E0000`, users read
"SIGILL" as a crash.

`start()` (the CLI calls it before TensorFlow is imported) points fd 2 at a
pipe read by a small filter process (this file, run with the stdlib alone),
which writes to the real stderr every line except the noise:

- absl's banner, `I` lines and `W` lines (TensorFlow's C++ warnings, which
  TF_CPP_MIN_LOG_LEVEL=2, the job's default, means to hide);
- `E` lines on the short list of known-harmless messages, KNOWN_HARMLESS.

Everything else passes, byte for byte: an `E` line not on the list, an `F`
(fatal) line, a segfault's message, anything that is not a C++ log line.
`--verbose` (or TF_CPP_MIN_LOG_LEVEL=0 or 1) shows more; `--log-format json`
wraps every line it shows as a JSON object with its level. Python's own
output (logging, click, tracebacks) goes to the real stderr directly: a
terminal stays a terminal for the progress line.

Why a process and not a thread: it outlives a hard crash (abort, SIGSEGV,
SIGKILL) of the job, reads to the end of the pipe and forwards the crash's
last words; and it never waits on the job's GIL. `stop()`, called on every
exit the job controls (atexit, `_exit_without_teardown`), restores fd 2 and
waits for it to drain the pipe. Limits: a container whose job is PID 1 and
dies hard takes the filter with it, so a line written in the last
microseconds may be lost; a line without a newline waits for one (or for the
end); C++ lines may land a moment after Python lines written after them;
the second and later lines of a multi-line C++ message pass even if its
first is hidden (and are ERRORs in JSON): absl writes them as they are.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime

# `I0000 00:00:1796405709.965516   16145 port.cc:153] message` (absl's format;
# before absl is initialised the date is 0000 00:00 and the seconds count from 1970).
NATIVE_LINE = re.compile(
    r"(?P<level>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ (?P<source>[^\s\]]+:\d+)\] (?P<message>.*)"
)
BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# LiteRT's own logger (`mnist-job export` runs a .tflite file) writes its INFO
# lines as `INFO: message`, e.g. "Created TensorFlow Lite XNNPACK delegate for CPU.".
LITERT_INFO = "INFO: "
LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
LEVEL_NAMES = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}

# `E` lines known to be harmless: (source file, message), both regexes, and why.
KNOWN_HARMLESS = (
    # XLA's compile cache (job/compile_cache.py), on every run that loads an
    # entry; delete these two if the cache goes. TensorFlow first tries the
    # entry as text, fails, then reads it as binary: the step loads and runs.
    (r"text_format\.cc", r"Error parsing text-format tensorflow\.XlaSerializedCacheEntry: "),
    # The entry's CPU features include two tuning hints that the host's list
    # never names; a missing instruction set (+avx512f...) still shows, and the
    # cache keys its entries by CPU anyway.
    (
        r"cpu_aot_loader\.cc",
        r"Loading XLA:CPU AOT result\. Target machine feature \+prefer-no-(scatter|gather) "
        r"is not +supported on the host machine\.",
    ),
)
_HARMLESS = [(re.compile(source), re.compile(message)) for source, message in KNOWN_HARMLESS]

_state: dict = {}  # the filter process and the real stderr, while started
_still_running: list = []  # filters that a subprocess of the job kept open at exit


def shown(line: str, min_level: int) -> bool:
    """Whether `line` (no newline) reaches the user. min_level as
    TF_CPP_MIN_LOG_LEVEL: 0 shows everything, 2 hides I and W lines and the
    known-harmless E lines; E lines otherwise and F lines always show."""
    if line == BANNER:
        return min_level < 2
    if line.startswith(LITERT_INFO):
        return min_level < 1
    native = NATIVE_LINE.fullmatch(line)
    if native is None:
        return True
    level = LEVELS[native["level"]]
    if level == LEVELS["E"] and min_level >= 2:
        return not any(
            source.fullmatch(native["source"].split(":")[0]) and message.match(native["message"])
            for source, message in _HARMLESS
        )
    return level >= min(min_level, 2)


def as_json(line: str) -> str:
    """`line` as one JSON object like job.logs' (time, level, logger, message);
    a C++ log line also names its `source` file:line. Any other line is an
    ERROR: a crash's message, or the second line of a multi-line C++ message
    (absl writes those as they are), which cannot be told apart."""
    entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds")}
    native = NATIVE_LINE.fullmatch(line)
    if native:
        entry.update(level=LEVEL_NAMES[native["level"]], logger="tensorflow")
        entry.update(message=native["message"], source=native["source"])
    elif line == BANNER:
        entry.update(level="WARNING", logger="absl", message=line)
    else:
        entry.update(level="ERROR", logger="stderr", message=line)
    return json.dumps(entry)


def serve(source: int, sink: int, min_level: int, json_lines: bool) -> None:
    """Copy lines from fd `source` to fd `sink` until its end, less the hidden
    ones; each line is written as soon as it is whole."""
    pending = b""
    while chunk := os.read(source, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            _forward(raw + b"\n", sink, min_level, json_lines)
    if pending:  # the last words, without a newline
        _forward(pending, sink, min_level, json_lines)


def _forward(raw: bytes, sink: int, min_level: int, json_lines: bool) -> None:
    data = raw
    try:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not shown(line, min_level):
            return
        if json_lines:
            data = (as_json(line) + "\n").encode()
    except Exception:  # never lose a line to a bug here
        pass
    with contextlib.suppress(OSError):  # stderr closed: read on, the job must not block
        os.write(sink, data)


def start(verbosity: int, log_format: str) -> None:
    """Filter fd 2 as the module docstring says; Python's sys.stderr keeps the
    real stderr. Once a process; where a filter cannot start, output is as before."""
    if _state or os.name != "posix" or sys.stderr is None:
        return
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL") or 2)
    except ValueError:
        level = 2
    min_level = 0 if verbosity >= 2 else max(0, min(level, 2))
    try:
        real = os.dup(2)
    except OSError:  # no fd 2 (2>&-): nothing to filter
        return
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(min_level), log_format],
            stdin=subprocess.PIPE,
            stdout=real,
            stderr=real,
            start_new_session=True,  # a Ctrl-C or a group's SIGTERM is the job's alone
        )
    except OSError:
        os.close(real)
        return
    sys.stderr.flush()
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()
    _state.update(child=child, real=real, stderr=sys.stderr)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w", closefd=False),
        encoding=sys.stderr.encoding,
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )
    atexit.register(stop)


def stop(timeout: float = 5.0) -> None:
    """Give fd 2 back to the real stderr and wait (up to `timeout` s) for the
    filter to write what it has; a no-op if not started."""
    if not _state:
        return
    sys.stderr.flush()
    sys.stderr = _state["stderr"]
    os.dup2(_state["real"], 2)  # the pipe's last writer closes: the filter sees its end
    try:
        _state["child"].wait(timeout)
    except subprocess.TimeoutExpired:  # a subprocess of the job still holds the pipe
        _still_running.append(_state["child"])
    # The real stderr's copy stays open: a log handler may still write to it.
    _state.clear()


if __name__ == "__main__":  # the filter process: python -I -S native_log.py MIN_LEVEL FORMAT
    serve(0, 1, int(sys.argv[1]), sys.argv[2] == "json")
    os._exit(0)  # nothing to tear down: the job waits on this exit
