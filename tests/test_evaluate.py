"""`mnist-job evaluate` and the figures `train` writes: numbers users can trust
(they match Keras' own evaluate) and the two PNGs, at their documented size."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

from job.errors import ConfigError
from job.evaluate import evaluate, report
from tests.conftest import run_tiny_job
from tests.events import image_tags

# plots.CONFUSION_MATRIX_INCHES and GALLERY_INCHES at 100 dpi.
SIZES = {"confusion_matrix.png": (700, 600), "misclassified.png": (800, 1100)}


def assert_figures(directory) -> None:
    for name, size in SIZES.items():
        with Image.open(directory / name) as image:
            assert image.format == "PNG" and image.size == size, name


def test_train_writes_both_figures_and_logs_them_to_tensorboard(finished_run):
    config, _ = finished_run
    assert_figures(config.output_dir)
    tags = image_tags(config.tensorboard_path / "validation")
    assert {"confusion_matrix", "misclassified", "predictions"} <= tags


def test_numbers_match_keras_evaluate(finished_run, tiny, tmp_path):
    config, result = finished_run
    found, paths = evaluate(config.output_dir, None, tmp_path / "eval", datasets=tiny)

    model = keras.saving.load_model(config.model_path)  # compiled as the seed compiled it
    loss, accuracy = model.evaluate(tiny.x_test / np.float32(255), tiny.y_test, verbose=0)
    assert found.loss == pytest.approx(loss, rel=1e-4)
    assert found.accuracy == pytest.approx(accuracy, abs=1e-6)
    assert found.accuracy == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)
    assert found.images == len(tiny.y_test) == found.confusion.sum()
    assert set(paths) == {"confusion_matrix", "misclassified"}
    assert_figures(tmp_path / "eval")

    # Per-digit precision and recall, counted directly.
    predicted = model.predict(tiny.x_test / np.float32(255), verbose=0).argmax(axis=1)
    for digit in range(10):
        hits = np.sum((predicted == digit) & (tiny.y_test == digit))
        if np.any(predicted == digit):
            assert found.precision[digit] == pytest.approx(hits / np.sum(predicted == digit))
        assert found.recall[digit] == pytest.approx(hits / np.sum(tiny.y_test == digit))


def test_evaluate_will_not_write_into_a_dir_a_training_run_holds(finished_run, tiny, tmp_path):
    from job import dirlock

    config, _ = finished_run
    held = tmp_path / "training"
    held.mkdir()
    with dirlock.held(held):
        with pytest.raises(ConfigError, match="is in use by process") as err:
            evaluate(config.output_dir, None, held, datasets=tiny)
        assert list(held.iterdir()) == [held / dirlock.LOCK_NAME]  # no figure written
    assert err.value.exit_code == 2


def test_report_counts_and_undefined_precision():
    labels = np.array([0, 0, 1, 2])
    probabilities = np.full((4, 10), 0.01)
    probabilities[[0, 1, 2, 3], [0, 1, 1, 1]] = 0.91  # predicts 0, 1, 1, 1
    found = report(labels, probabilities)
    assert found.accuracy == 0.5
    assert found.confusion[0].tolist()[:3] == [1, 1, 0] and found.confusion[2, 1] == 1
    assert found.precision[:3] == [1.0, pytest.approx(1 / 3), None]  # 2 is never predicted
    assert found.recall[:3] == [0.5, 1.0, 0.0]
    assert found.loss == pytest.approx(-np.log([0.91, 0.01, 0.91, 0.01]).mean())
    assert json.loads(json.dumps(found.to_dict()))["classes"][2]["precision"] is None


def test_missing_model_is_a_config_error(tmp_path, tiny):
    with pytest.raises(ConfigError, match="no model"):
        evaluate(tmp_path, None, tmp_path / "eval", datasets=tiny)


def test_cli_json_and_text(finished_run, tmp_path):
    # The real CLI in a subprocess, with the tiny data in place of MNIST.
    config, result = finished_run
    out = tmp_path / "figures"
    done = run_tiny_job("evaluate", "--model", str(config.output_dir), "--output-dir", str(out),
                        "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)
    assert [c["digit"] for c in found["classes"]] == list(range(10))
    assert np.array(found["confusion_matrix"]).sum() == found["images"] == 80
    assert_figures(out)

    # Text, and the figures next to the model by default.
    model_copy = tmp_path / "copy"
    model_copy.mkdir()
    (model_copy / "model.keras").write_bytes(config.model_path.read_bytes())
    done = run_tiny_job("evaluate", "--model", str(model_copy / "model.keras"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("test loss ")
    assert "digit  precision  recall  support" in done.stdout
    assert_figures(model_copy)
