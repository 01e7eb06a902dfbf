"""`mnist-job export` as users run it (job/export_cli.py): a subprocess of the
real CLI, its one line on stdout or stderr, its exit code, and what is left at
the output path. The formats themselves: test_export.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from job import export
from job.errors import ExitCode
from tests.conftest import error_lines, run_job


@pytest.fixture(scope="module")
def model(finished_run, tmp_path_factory):
    """A copy of the finished tiny run's model.keras, outside the shared run's dir."""
    config, _ = finished_run
    path = tmp_path_factory.mktemp("model") / "model.keras"
    shutil.copy(config.model_path, path)
    return path


def test_the_command_writes_beside_the_model_and_says_what_it_checked(model, tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    shutil.copy(model, local / "model.keras")
    result = run_job("export", "--model", str(local), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{local / 'model.onnx'}: onnx, ")
    assert "onnxruntime" in result.stdout and "matches Keras" in result.stdout
    assert sorted(p.name for p in local.iterdir()) == ["model.keras", "model.onnx"]
    # TensorFlow's and the converters' chatter stays off stderr.
    assert result.stderr == ""


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_a_model_no_runtime_can_match_exits_1_with_nothing_at_the_output(model, tmp_path, fmt):
    import keras

    broken = keras.saving.load_model(model, compile=False)
    weights = broken.get_weights()
    weights[-1][3] = np.nan  # outputs NaN: never equal to anything, itself included
    broken.set_weights(weights)
    broken.save(tmp_path / "model.keras")
    out = tmp_path / "out" / export.DEFAULT_NAMES[fmt]

    result = run_job("export", "--model", str(tmp_path), "--format", fmt, "--output", str(out))
    assert result.returncode == ExitCode.FAILURE
    (line,) = error_lines(result.stderr)
    assert "differ from Keras' by NaN" in line and "nothing written" in line
    assert "Traceback" not in result.stderr
    assert list(out.parent.iterdir()) == []  # neither the export nor a temporary


def write_file(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/nowhere", "--format", "onnx"], "no model at {tmp}/nowhere:"),
        (["--model", "{tmp}/bad.keras", "--format", "onnx"], "not a complete .keras file"),
        (["--model", "{model}", "--format", "torch"], "'torch' is not one of"),
        (["--model", "{model}"], "Missing option '--format'"),
        (["--model", "{model}", "--format", "onnx", "--output", "{tmp}/bad.keras/m.onnx"],
         "--output dir {tmp}/bad.keras is not writable"),
        (["--model", "{model}", "--format", "litert", "--output", "{tmp}/m.bin"], "end in .tflite"),
        (["--model", "{model}", "--format", "onnx", "--output", "s3://bucket/m.onnx"],
         "exports are written to a local path"),
        (["--model", "{model}", "--format", "onnx", "--version", "1"], "saved_model only"),
        (["--model", "{model}", "--format", "saved_model", "--output", "{tmp}"],
         "{tmp} exists and is not a SavedModel: not replaced"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, args, message):
    write_file(tmp_path / "bad.keras", b"PK\x03\x04 truncated")
    args = [arg.format(tmp=tmp_path, model=model) for arg in args]
    before = sorted(p.name for p in tmp_path.iterdir())

    result = run_job("export", *args)
    assert result.returncode == ExitCode.USAGE, result.stderr
    (line,) = error_lines(result.stderr)
    assert message.format(tmp=tmp_path) in line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
