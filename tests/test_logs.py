"""Log output where the job runs: JSON lines for aggregators, plain lines in
containers (no control characters), a progress line on a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from job import logs
from tests.conftest import ROOT, run_job, run_tiny_job

# What TensorFlow's C++ runtime prints on stderr, whatever TF_CPP_MIN_LOG_LEVEL
# says (TF 2.21): shown with --verbose only (job/native_log.py).
TF_RUNTIME_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IWEF]\d{4} .*)$"
)
CONTROL = re.compile(r"[\r\x1b]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    root, tensorflow = logging.getLogger(), logging.getLogger("tensorflow")
    handlers, level, tensorflow_level = root.handlers[:], root.level, tensorflow.level
    yield
    root.handlers[:], root.level = handlers, level
    tensorflow.setLevel(tensorflow_level)
    logging.captureWarnings(False)


def progress(log: logging.Logger, step: int, steps: int = 100) -> None:
    extra = {"event": "progress", "epoch": 1, "epochs": 3, "step": step, "steps": steps,
             "seconds": 2.0, "images": step * 32}  # fmt: skip
    log.info("epoch 1/3: step %d/%d", step, steps, extra=extra)


def test_fields_tag_every_record_of_a_block_and_only_that_block(restore_logging):
    stream = io.StringIO()
    logs.configure(1, "json", stream)
    log = logging.getLogger("job.test")
    with logs.fields(task_type="worker", task_index=1):
        log.info("inside", extra={"event": "epoch"})
        logging.getLogger("tensorflow").warning("from TensorFlow")
    log.info("after")
    inside, tensorflow, after = map(json.loads, stream.getvalue().splitlines())
    for record in (inside, tensorflow):
        assert (record["task_type"], record["task_index"]) == ("worker", 1)
    assert inside["event"] == "epoch"
    assert "task_index" not in after


def test_task_fields_name_a_workers_task_only_in_multi_worker_runs(restore_logging):
    from job.strategy import Cluster

    stream = io.StringIO()
    logs.configure(1, "json", stream)
    log = logging.getLogger("job.test")
    two = {"worker": ["a:2222", "b:2222"]}
    with logs.task_fields(Cluster(two, "worker", 1, "TF_CONFIG")):
        log.info("multi")
    with logs.task_fields(Cluster({}, "worker", 0, "single")):
        log.info("single")
    multi, single = map(json.loads, stream.getvalue().splitlines())
    assert (multi["task_type"], multi["task_index"]) == ("worker", 1)
    assert "task_index" not in single


def test_object_store_clients_say_where_credentials_are_with_verbose_only(restore_logging):
    stream = io.StringIO()
    for verbosity in (1, 2):
        logs.configure(verbosity, "text", stream)
        logging.getLogger("botocore.credentials").info("Found credentials (%d)", verbosity)
        logging.getLogger("asyncio").error("Task exception was never retrieved (%d)", verbosity)
    text = stream.getvalue()
    assert "(1)" not in text
    assert "Found credentials (2)" in text and "never retrieved (2)" in text


def test_tensorflows_info_lines_show_with_verbose_only(restore_logging):
    stream = io.StringIO()
    tensorflow = logging.getLogger("tensorflow")
    for verbosity in (1, 2):
        logs.configure(verbosity, "text", stream)
        tensorflow.info("Collective all_reduce tensors (verbosity %d)", verbosity)
        tensorflow.warning("a TensorFlow warning (verbosity %d)", verbosity)
    text = stream.getvalue()
    assert "all_reduce tensors (verbosity 1)" not in text
    assert "all_reduce tensors (verbosity 2)" in text
    assert "warning (verbosity 1)" in text


def test_json_is_one_object_per_line_with_the_structured_fields(restore_logging):
    stream = io.StringIO()
    logs.configure(1, "json", stream)
    log = logging.getLogger("job.test")
    log.info("epoch %d: loss %.2f", 1, 0.5, extra={"event": "epoch", "epoch": 1, "loss": 0.5})
    progress(log, 50)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not at verbosity 1")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # no progress record, no debug
    epoch, failure = map(json.loads, lines)
    assert epoch["message"] == "epoch 1: loss 0.50"
    assert (epoch["event"], epoch["epoch"], epoch["loss"]) == ("epoch", 1, 0.5)
    assert (epoch["level"], epoch["logger"]) == ("INFO", "job.test")
    assert epoch["time"].endswith("+00:00")
    assert "ValueError: boom" in failure["exception"]


@pytest.mark.parametrize("log_format", ["auto", "text"])
def test_plain_lines_when_not_a_terminal(restore_logging, log_format):
    stream = io.StringIO()
    logs.configure(1, log_format, stream)
    log = logging.getLogger("job.test")
    progress(log, 10)
    log.info("epoch 1/3: loss 0.5 (1.00 s, 60000 images/s)")
    output = stream.getvalue()
    assert not CONTROL.search(output)
    assert output.count("\n") == 1 and "INFO job.test: epoch 1/3: loss 0.5" in output


def test_progress_line_redrawn_in_place_on_a_terminal(restore_logging):
    stream = Terminal()
    logs.configure(1, "auto", stream)
    log = logging.getLogger("job.test")
    progress(log, 0)
    progress(log, 50)
    log.info("epoch 1/3 done")
    output = stream.getvalue()
    assert "\x1b" not in output  # carriage returns and spaces only: any terminal
    first, second, cleared = output.split("\r")[1:4]
    assert first.startswith("epoch 1/3 [------------------------]   0/100 steps")
    assert second.startswith("epoch 1/3 [############------------]  50/100 steps  2.0 s  800")
    assert cleared.strip() == ""  # the progress line is wiped before a normal line
    assert output.endswith("epoch 1/3 done\n")


def test_train_json_logs_parse(tmp_path):
    result = run_tiny_job("train", "--epochs", "2", "--checkpoint-every", "4", "--output-dir",
                          str(tmp_path / "out"), "--log-format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line
    events = [r.get("event") for r in records]
    assert events.count("epoch") == 2 and "progress" not in events
    assert (
        events.index("start") < events.index("epoch") < events.index("test") < events.index("end")
    )
    epoch = next(r for r in records if r.get("event") == "epoch")
    assert set(epoch) >= {"epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy",
                          "seconds", "images_per_second"}  # fmt: skip
    assert "task_index" not in epoch  # only a multi-worker run names its worker
    end = records[events.index("end")]
    assert end["test"]["accuracy"] > 0.5 and "fit_seconds" in end["timings"]
    assert not CONTROL.search(result.stderr + result.stdout)


def test_train_in_a_container_prints_one_plain_line_per_epoch(tmp_path):
    # stdout and stderr are pipes, as in a container or a Kubernetes pod.
    result = run_tiny_job("train", "--epochs", "3", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert not CONTROL.search(result.stderr + result.stdout)
    epochs = [line for line in result.stderr.splitlines() if re.search(r"epoch \d/3:", line)]
    assert len(epochs) == 3
    assert all(re.search(r"\d+ images/s\)$", line) for line in epochs)


def test_train_on_a_terminal_shows_a_progress_line(tmp_path):
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tiny_job.py"), "train", "--epochs", "2",
         "--checkpoint-every", "4", "--output-dir", str(tmp_path / "out")],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")
    text = output.decode()
    assert "\repoch 1/2 [" in text and "\repoch 2/2 [" in text
    assert re.search(r"\repoch 1/2 \[#+-*\]\s+4/10 steps", text)
    assert "\x1b" not in text


def tensorflow_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if TF_RUNTIME_LINE.match(line)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output dir, compile cache) of a tiny run whose cache holds its step."""
    tmp = tmp_path_factory.mktemp("quiet")
    out, cache = tmp / "out", tmp / "xla"
    result = run_tiny_job("train", "--epochs", "1", "--output-dir", str(out),
                          "--compile-cache", str(cache))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    assert list(cache.rglob("*.pb")), "the run cached no compiled step"
    return out, cache


@pytest.mark.parametrize("verbosity", ["default", "--quiet"])
def test_no_tensorflow_chatter_with_a_warm_compile_cache(trained, tmp_path, verbosity):
    # Loading a cached step made TensorFlow print three harmless E0000 lines.
    _, cache = trained
    flags = [] if verbosity == "default" else [verbosity]
    result = run_tiny_job("train", "--epochs", "1", "--output-dir", str(tmp_path / "out"),
                          "--compile-cache", str(cache), *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    assert "SIGILL" not in result.stderr
    if verbosity == "--quiet":
        assert result.stderr == ""


def test_no_tensorflow_chatter_from_predict_evaluate_info(trained):
    out, _ = trained
    for result in (
        run_job("predict", "--model", str(out), str(out / "predictions.png")),
        run_tiny_job("evaluate", "--model", str(out)),
        run_job("info"),
    ):
        assert result.returncode == 0, result.stderr
        assert tensorflow_lines(result.stderr) == [], result.args


# An INFO line on every CPU (the import-time ones, oneDNN's or the CPU feature
# guard's, depend on the CPU's instruction sets).
XLA_SERVICE_LINE = r"I\d{4} .* service\.cc:\d+\] XLA service .* initialized for platform Host"


def test_verbose_shows_tensorflows_lines_as_json_objects_too(trained, tmp_path):
    _, cache = trained
    common = ["train", "--epochs", "1", "--compile-cache", str(cache), "--verbose"]
    result = run_tiny_job(*common, "--output-dir", str(tmp_path / "text"))
    assert result.returncode == 0, result.stderr
    lines = tensorflow_lines(result.stderr)
    assert lines, result.stderr
    assert lines[0].startswith("WARNING: All log messages before absl::InitializeLog()")
    assert any(re.match(XLA_SERVICE_LINE, line) for line in lines), lines
    assert any("XlaSerializedCacheEntry" in line for line in lines), lines

    result = run_tiny_job(*common, "--output-dir", str(tmp_path / "json"), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line
    native = {(r["level"], r.get("source", "").split(":")[0]) for r in records
              if r["logger"] == "tensorflow" and "source" in r}  # fmt: skip
    assert {("ERROR", "text_format.cc"), ("INFO", "service.cc")} <= native, native


def test_the_clis_last_words_are_json_where_the_log_is(restore_logging, capsys):
    stream = io.StringIO()
    logs.configure(1, "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        logs.print_error(None, err)
    logs.print_error("mnist-job: error: no model")
    crash, error = map(json.loads, stream.getvalue().splitlines())
    assert crash["level"] == "ERROR" and "RuntimeError: boom" in crash["exception"]
    assert error["message"] == "mnist-job: error: no model"

    logs.configure(1, "text", stream)  # plain lines, on stderr as before
    logs.print_error("mnist-job: error: no model", RuntimeError("boom"))
    assert capsys.readouterr().err.endswith("RuntimeError: boom\nmnist-job: error: no model\n")


def test_a_failed_run_logged_as_json_ends_with_a_json_error(tmp_path):
    result = run_tiny_job("train", "--learning-rate", "1e30", "--output-dir", str(tmp_path),
                          "--log-format", "json")  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = [json.loads(line) for line in result.stderr.splitlines()][-1]  # every line
    assert last["level"] == "ERROR" and "training diverged" in last["message"]
