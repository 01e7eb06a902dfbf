"""What a finished run leaves in its output dir, on tiny data: the model, the
figures, metrics.json last, and a finished run replaced only on purpose."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from job import outputs
from job.checkpoint import TrainState
from job.errors import ConfigError
from job.runner import run
from tests.events import scalars


def test_writes_every_artifact(finished_run):
    config, _ = finished_run
    out = config.output_dir
    for name in ("model.keras", "saved_model", "tensorboard", "predictions.png", "metrics.json"):
        assert (out / name).exists(), name
    assert not list(out.glob(".*")), "temporary files left behind"


def test_model_keras_reloads_and_predicts_the_same(finished_run, tiny):
    config, result = finished_run
    images = tiny.x_test.astype(np.float32) / 255.0
    reloaded = keras.models.load_model(config.output_dir / "model.keras")
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), result.model.predict(images, verbose=0), atol=1e-6
    )
    # Compiled as the seed compiled it, so users can evaluate straight away.
    _, accuracy = reloaded.evaluate(images, tiny.y_test, verbose=0)
    assert accuracy == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)


def test_saved_model_serves_class_probabilities(finished_run, tiny):
    config, result = finished_run
    images = tiny.x_test[:7].astype(np.float32) / 255.0
    serving = tf.saved_model.load(str(config.output_dir / "saved_model"))
    probabilities = serving.serve(tf.constant(images)).numpy()
    assert probabilities.shape == (7, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, result.model.predict(images, verbose=0), atol=1e-6)


def test_predictions_png_has_one_panel_per_image(finished_run):
    config, _ = finished_run
    with Image.open(config.output_dir / "predictions.png") as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)  # 2 inches a panel at 100 dpi, 3 panels


def test_metrics_json_records_the_run(finished_run):
    config, result = finished_run
    metrics = json.loads((config.output_dir / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 2
    assert [record["epoch"] for record in metrics["history"]] == [1, 2]
    assert set(metrics["history"][0]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert metrics["test"]["accuracy"] == result.metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] > 0.5  # the tiny data is learnable
    assert set(metrics["timings"]) >= {"data_seconds", "fit_seconds", "evaluate_seconds"}
    assert metrics["throughput"]["train_images_per_second"] > 0
    assert set(metrics["versions"]) >= {"python", "tensorflow", "keras"}
    assert metrics["devices"]["strategy"] == "default"


def test_finished_run_is_not_overwritten_without_flag(finished_run, tiny):
    config, _ = finished_run
    before = (config.output_dir / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        run(config, datasets=tiny)
    assert (config.output_dir / "metrics.json").read_bytes() == before


def test_overwrite_replaces_a_finished_run(tmp_path, tiny, tiny_config):
    run(tiny_config, datasets=tiny)
    again = run(tiny_config.replace(overwrite=True, epochs=1), datasets=tiny)
    metrics = json.loads((tiny_config.output_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 == len(again.metrics["history"])
    # The old run's logs are gone, not mixed into the new run's.
    found = scalars(tiny_config.output_dir / "tensorboard" / "train")
    assert [step for step, _ in found["epoch_loss"]] == [1]


@pytest.mark.parametrize(
    ("option", "what"),
    [
        ("output_dir", "output dir"),
        ("model_dir", "model dir"),
        ("checkpoint_dir", "checkpoint dir"),
        ("tensorboard_dir", "TensorBoard dir"),
    ],
)
def test_an_unwritable_dir_is_a_config_error_before_training(
    tmp_path, tiny, tiny_config, monkeypatch, option, what
):
    from job.loop import Trainer

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(Trainer, "fit", None)  # training would crash the test
    with pytest.raises(ConfigError, match=f"^{what} .* is not writable"):
        run(tiny_config.replace(**{option: blocker / "sub"}), datasets=tiny)


def _files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("failure", ["batch size", "data"])
def test_overwrite_that_fails_its_checks_leaves_the_finished_run_intact(
    tiny, tiny_config, monkeypatch, failure
):
    from job import runner
    from job.errors import DataError

    run(tiny_config, datasets=tiny)
    before = _files(tiny_config.output_dir)
    again = tiny_config.replace(overwrite=True)
    if failure == "batch size":
        again, error = again.replace(batch_size=100_000), ConfigError
    else:

        def unavailable(*args):
            raise DataError("cannot get MNIST")

        monkeypatch.setattr(runner, "_load_splits", unavailable)
        error = DataError
    with pytest.raises(error):
        run(again, datasets=tiny)
    assert _files(tiny_config.output_dir) == before


def test_overwrite_removes_the_old_model_once_training_starts(tiny, tiny_config, monkeypatch):
    # Else predict and evaluate would use it beside an unfinished new run.
    from job.loop import Trainer

    run(tiny_config, datasets=tiny)

    def preempted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", preempted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config.replace(overwrite=True), datasets=tiny)
    assert not tiny_config.metrics_path.exists()
    assert not tiny_config.model_path.exists() and not tiny_config.saved_model_path.exists()


def test_a_claimed_output_dir_holds_only_its_lock_until_the_run_writes(tiny_config):
    with outputs.claimed(tiny_config, is_chief=True):
        # checkpoints/ and tensorboard/ are made when first written.
        assert [p.name for p in tiny_config.output_dir.iterdir()] == [".mnist-job.lock"]
        with pytest.raises(ConfigError, match="is in use by process"):
            run(tiny_config, datasets=None)
    assert list(tiny_config.output_dir.iterdir()) == []


def test_every_worker_refuses_a_finished_run_before_waiting_for_the_others(tiny_config):
    tiny_config.output_dir.mkdir()
    tiny_config.metrics_path.write_text("{}")
    for is_chief in (True, False):
        with (
            pytest.raises(ConfigError, match="holds a finished run"),
            outputs.claimed(tiny_config, is_chief),
        ):
            pass


def test_metrics_count_only_the_images_this_process_trained():
    from types import SimpleNamespace

    from job.config import TrainConfig

    config = TrainConfig(epochs=3, batch_size=10)
    state = TrainState(epoch=3, steps_per_epoch=5, fingerprint={"train_size": 50})
    placement = SimpleNamespace(
        strategy_name="default",
        num_replicas=1,
        cluster=SimpleNamespace(num_workers=0),
        gpus=[],
        cpu_threads=2,
    )
    evaluation = SimpleNamespace(loss=0.5, accuracy=0.9)
    resumed = {"epoch": 1, "step": 2}  # 7 of 15 steps were done before
    timings = {"fit_seconds": 2.0}
    metrics = outputs.metrics(config, placement, state, evaluation, resumed, timings)
    assert metrics["throughput"]["train_images_per_second"] == (15 - 7) * 10 / 2.0
    assert metrics["resumed_from"] == resumed
    assert metrics["devices"]["workers"] == 1  # a single process has no cluster spec
    done = outputs.metrics(config, placement, state, evaluation, {"epoch": 3, "step": 0}, timings)
    assert done["throughput"]["train_images_per_second"] is None  # nothing left to train


def test_versions_name_what_ran():
    import job

    found = outputs.versions()
    assert found["tensorflow"] == tf.__version__ and found["keras"] == keras.__version__
    assert found["mnist_job"] == job.__version__
