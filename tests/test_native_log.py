"""TensorFlow's C++ lines on stderr: the noise hidden, every error and a
crash's last words kept (job/native_log.py). End-to-end runs of the CLI are in
test_logs.py; these start no TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from job.native_log import BANNER, as_json, shown
from tests.conftest import ROOT

# As TensorFlow 2.21 prints them (the AOT loader's feature lists shortened).
ONEDNN = (
    "I0000 00:00:1796405709.965516   16145 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off errors"
)
CPU_GUARD = (
    "W0000 00:00:1796405709.965516   16145 cpu_feature_guard.cc:227] This TensorFlow binary "
    "is optimized to use available CPU instructions"
)
CACHE_TEXT_FORMAT = (
    "E0000 00:00:1796405715.846639   16172 text_format.cc:378] Error parsing text-format "
    "tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, got: 5"
)
AOT = (
    "E0000 00:00:1796405715.852590   16172 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. "
    "Target machine feature +{feature} is not  supported on the host machine. Machine type "
    "used for XLA:CPU compilation doesn't match the machine type for execution. Compile "
    "machine features: [+64bit,+adx,+avx512f] vs host machine features: [64bit,adx]. "
    "This could lead to execution errors such as SIGILL."
)
LITERT_XNNPACK = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
NOISE = [BANNER, ONEDNN, CPU_GUARD, CACHE_TEXT_FORMAT, AOT.format(feature="prefer-no-scatter"),
         AOT.format(feature="prefer-no-gather"), LITERT_XNNPACK]  # fmt: skip
# What must always reach the user.
REAL_ERROR = "E0000 00:00:1796405715.9   16172 cuda_dnn.cc:522] Could not create cudnn handle"
FATAL = "F0000 00:00:1796405716.1   16172 tensor.cc:844] Check failed: shape mismatch"
MISSING_ISA = AOT.format(feature="avx512f")  # a real SIGILL risk: not on the list
CRASH = "Fatal Python error: Segmentation fault"
MUST_SHOW = [REAL_ERROR, FATAL, MISSING_ISA, CRASH, "Traceback (most recent call last):"]


def test_default_and_quiet_hide_the_noise_only():
    assert [line for line in NOISE if shown(line, 2)] == []
    assert [line for line in MUST_SHOW if not shown(line, 2)] == []


def test_verbose_shows_everything_and_tf_cpp_min_log_level_is_respected():
    assert all(shown(line, 0) for line in NOISE + MUST_SHOW)
    # TF_CPP_MIN_LOG_LEVEL=1: warnings, not INFO; every error, harmless or not.
    assert not shown(ONEDNN, 1)
    assert all(shown(line, 1) for line in (BANNER, CPU_GUARD, CACHE_TEXT_FORMAT))
    assert all(shown(line, 3) for line in MUST_SHOW)  # never an error, whatever the level


def test_json_names_the_level_and_source():
    fatal = json.loads(as_json(FATAL))
    assert (fatal["level"], fatal["logger"], fatal["source"]) == ("CRITICAL", "tensorflow",
                                                                  "tensor.cc:844")  # fmt: skip
    assert fatal["message"] == "Check failed: shape mismatch"
    assert json.loads(as_json(ONEDNN))["level"] == "INFO"
    assert json.loads(as_json(BANNER))["level"] == "WARNING"
    crash = json.loads(as_json(CRASH))
    assert (crash["level"], crash["logger"], crash["message"]) == ("ERROR", "stderr", CRASH)


# A process that starts the filter, writes C++-style lines to fd 2 as
# TensorFlow does, a line from Python, then ends as argv[2] says.
PROCESS = """
import logging, os, signal, sys
from job import native_log
native_log.start(int(sys.argv[3]), sys.argv[1])
for line in sys.argv[4:]:
    os.write(2, (line + "\\n").encode())
print("python's own line", file=sys.stderr)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
native_log.stop()  # as _exit_without_teardown: drained, then exit
os.write(2, b"after stop\\n")
os._exit(0)
"""


def run_process(log_format: str, end: str, verbosity: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROCESS, log_format, end, str(verbosity), *NOISE, *MUST_SHOW],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_errors_and_last_words_reach_stderr_even_after_sigkill(end):
    result = run_process("text", end)
    assert result.returncode == (-9 if end == "kill" else 0), result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in NOISE if line in lines] == []
    assert [line for line in MUST_SHOW if line not in lines] == []
    assert "python's own line" in lines
    if end == "stop":  # stop() returns once the filter has written all it had
        assert lines[-1] == "after stop" and lines.index(CRASH) < len(lines) - 1


def test_json_and_verbose_every_line_is_an_object():
    result = run_process("json", "stop", verbosity=2)
    python = {"python's own line", "after stop"}  # a print(), not a log record
    records = [json.loads(line) for line in result.stderr.splitlines() if line not in python]
    native = [r for r in records if r["logger"] in ("tensorflow", "absl", "stderr")]
    assert len(native) == len(NOISE + MUST_SHOW)  # verbose: the noise too
    assert {r["level"] for r in native} == {"INFO", "WARNING", "ERROR", "CRITICAL"}
