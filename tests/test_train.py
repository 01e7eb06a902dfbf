"""End to end on tiny data: every artifact a user relies on, and the guards."""

from __future__ import annotations

import errno
import gc
import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from job.errors import ConfigError, Diverged
from job.runner import run
from tests.events import image_tags, scalars


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


def test_tensorboard_has_per_epoch_scalars_and_the_prediction_panel(finished_run):
    config, _ = finished_run
    logs = config.output_dir / "tensorboard"
    for run_name in ("train", "validation"):
        found = scalars(logs / run_name)
        for tag in ("epoch_loss", "epoch_accuracy"):
            assert [step for step, _ in found[tag]] == [1, 2], (run_name, tag)
    assert "predictions" in image_tags(logs / "validation")


def test_predictions_png_has_one_panel_per_image(finished_run):
    config, _ = finished_run
    with Image.open(config.output_dir / "predictions.png") as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)  # 2 inches a panel at 100 dpi, 3 panels


def test_predictions_png_wraps_every_ten_panels(tiny):
    from job.plots import predictions_panel

    count = 25
    png = predictions_panel(tiny.x_test[:count], tiny.y_test[:count], tiny.y_test[:count])
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (2000, 1200)  # 10 panels across, 3 rows


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


def test_run_leaves_the_garbage_collector_as_it_found_it(finished_run, tiny):
    # run() pauses the collector while TensorFlow starts up; a program that runs
    # several jobs in one process gets it back, whether the run finished or failed.
    config, _ = finished_run
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ConfigError):
        run(config, datasets=tiny)
    assert gc.isenabled() and gc.get_freeze_count() == 0


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


def cut_short_after_one_epoch(config, tiny):
    """Run one epoch of `config`, then pretend the run was cut short there:
    its checkpoint stays, its metrics.json (the "finished" mark) goes."""
    first = run(config.replace(epochs=1), datasets=tiny)
    (config.output_dir / "metrics.json").unlink()
    return first


def test_a_lost_connection_in_one_process_is_not_blamed_on_a_lost_worker(
    tiny, tiny_config, monkeypatch
):
    from job.loop import Trainer

    def unavailable(self, *args, **kwargs):
        raise tf.errors.UnavailableError(None, None, "connection reset")

    monkeypatch.setattr(Trainer, "fit", unavailable)
    with pytest.raises(tf.errors.UnavailableError, match="connection reset"):
        run(tiny_config, datasets=tiny)


def test_resumes_from_checkpoint_without_retraining(tmp_path, tiny, tiny_config):
    first = cut_short_after_one_epoch(tiny_config, tiny)
    resumed = run(tiny_config.replace(epochs=3), datasets=tiny)
    assert resumed.metrics["resumed_from"] == {"epoch": 1, "step": 0}
    assert resumed.metrics["history"][0] == first.metrics["history"][0]
    assert [record["epoch"] for record in resumed.metrics["history"]] == [1, 2, 3]
    found = scalars(tiny_config.output_dir / "tensorboard" / "train")
    assert [step for step, _ in found["epoch_loss"]] == [1, 2, 3]


def test_resume_refuses_changed_settings(tmp_path, tiny, tiny_config):
    cut_short_after_one_epoch(tiny_config, tiny)
    with pytest.raises(ConfigError, match="batch_size"):
        run(tiny_config.replace(batch_size=16), datasets=tiny)


def test_seeded_deterministic_runs_are_bit_identical(tmp_path, tiny, tiny_config):
    config = tiny_config.replace(deterministic=True, seed=7)
    a = run(config.replace(output_dir=tmp_path / "a"), datasets=tiny)
    b = run(config.replace(output_dir=tmp_path / "b"), datasets=tiny)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert a.metrics["history"] == [
        {**r, "seconds": a.metrics["history"][i]["seconds"],
         "images_per_second": a.metrics["history"][i]["images_per_second"]}
        for i, r in enumerate(b.metrics["history"])
    ]  # fmt: skip
    assert a.metrics["test"] == b.metrics["test"]


def test_max_train_samples_limits_the_steps(tmp_path, tiny, tiny_config):
    result = run(tiny_config.replace(max_train_samples=64, epochs=1), datasets=tiny)
    assert result.metrics["config"]["max_train_samples"] == 64
    assert result.metrics["throughput"]["train_images_per_second"] > 0


def test_checkpoint_every_writes_mid_epoch_checkpoints(tmp_path, tiny, tiny_config, monkeypatch):
    from job import checkpoint

    saved = []
    real_save = checkpoint.save

    def spy(path, weights, optimizer_values, state):
        saved.append((state.epoch, state.step))
        real_save(path, weights, optimizer_values, state)

    monkeypatch.setattr(checkpoint, "save", spy)
    run(tiny_config.replace(epochs=1, checkpoint_every=4), datasets=tiny)
    # 320 images / 32 = 10 steps: checkpoints at steps 4 and 8, then the epoch end.
    assert saved == [(0, 4), (0, 8), (1, 0)]


def test_overwrite_still_resumes_a_compatible_unfinished_run(tmp_path, tiny, tiny_config):
    """A preempted pod whose spec says --overwrite must not lose its progress."""
    cut_short_after_one_epoch(tiny_config, tiny)
    resumed = run(tiny_config.replace(epochs=2, overwrite=True), datasets=tiny)
    assert resumed.metrics["resumed_from"] == {"epoch": 1, "step": 0}


def test_overwrite_starts_over_from_a_checkpoint_of_other_settings(tmp_path, tiny, tiny_config):
    cut_short_after_one_epoch(tiny_config, tiny)
    fresh = run(tiny_config.replace(batch_size=16, overwrite=True), datasets=tiny)
    assert fresh.metrics["resumed_from"] is None
    assert [record["epoch"] for record in fresh.metrics["history"]] == [1, 2]
    found = scalars(tiny_config.output_dir / "tensorboard" / "train")
    assert [step for step, _ in found["epoch_loss"]] == [1, 2]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:1000], ""),  # a half-copied file
        (lambda data: b"some other file", "not an .npz archive"),
    ],
    ids=["truncated", "not-npz"],
)
def test_a_corrupt_checkpoint_is_exit_2_and_overwrite_starts_over(
    tiny, tiny_config, damage, reason
):
    cut_short_after_one_epoch(tiny_config, tiny)
    latest = tiny_config.checkpoint_path
    latest.write_bytes(damage(latest.read_bytes()))
    with pytest.raises(
        ConfigError, match=f"is corrupt \\({reason}.*pass --overwrite to start over"
    ) as err:
        run(tiny_config, datasets=tiny)
    assert err.value.exit_code == 2  # a retry would read the same bytes
    fresh = run(tiny_config.replace(overwrite=True), datasets=tiny)
    assert fresh.metrics["resumed_from"] is None
    assert [record["epoch"] for record in fresh.metrics["history"]] == [1, 2]


def test_sigterm_in_one_process_stops_after_the_current_chunk(tiny, tiny_config, monkeypatch):
    """Not one chunk later (the vote that several workers need), and the time of
    the epoch's steps carries over into the resumed run's record."""
    import os
    import signal

    from job import checkpoint
    from job.errors import Terminated
    from job.loop import Trainer

    real_run_chunk = Trainer.run_chunk

    def sigterm_during_the_first_chunk(self, data, order, start, stop, stop_requested):
        result = real_run_chunk(self, data, order, start, stop, stop_requested)
        if start == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # run() has its handler in place
        return result

    monkeypatch.setattr(Trainer, "run_chunk", sigterm_during_the_first_chunk)
    config = tiny_config.replace(epochs=1, checkpoint_every=4)  # chunks of 4 of 10 steps
    with pytest.raises(Terminated, match="at epoch 1, step 4:"):
        run(config, datasets=tiny)
    _, _, saved = checkpoint.load(config.checkpoint_path)
    assert saved.step == 4 and saved.seconds > 0

    monkeypatch.setattr(Trainer, "run_chunk", real_run_chunk)
    resumed = run(config, datasets=tiny)
    assert resumed.metrics["history"][0]["seconds"] > saved.seconds


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


def test_a_checkpoint_past_epochs_is_refused_and_overwrite_starts_over(tiny, tiny_config):
    cut_short_after_one_epoch(tiny_config.replace(epochs=3), tiny)  # 1 of 3 epochs done...
    run(tiny_config.replace(epochs=2), datasets=tiny)  # ...then 2, and crashed before the end
    tiny_config.metrics_path.unlink()
    with pytest.raises(ConfigError, match=r"past --epochs 1 .*pass --epochs 2 or more") as err:
        run(tiny_config.replace(epochs=1), datasets=tiny)
    assert err.value.exit_code == 2
    fresh = run(tiny_config.replace(epochs=1, overwrite=True), datasets=tiny)
    assert fresh.metrics["resumed_from"] is None
    assert [record["epoch"] for record in fresh.metrics["history"]] == [1]


def _drop_last_weight(arrays):
    del arrays[max(k for k in arrays if k.startswith("weight_"))]


def _cut_first_weight(arrays):
    arrays["weight_0"] = arrays["weight_0"][:100]


def _bad_counter(arrays):
    state = json.loads(str(arrays["state"]))
    arrays["state"] = np.array(json.dumps({**state, "epoch": "x"}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_last_weight, "5 weight arrays, the model has 6"),
        (_cut_first_weight, "weight 0 has shape (100, 128), the model's (784, 128)"),
        (_bad_counter, "bad counters"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_exit_2_and_overwrite_starts_over(
    tiny, tiny_config, damage, message
):
    cut_short_after_one_epoch(tiny_config, tiny)
    latest = tiny_config.checkpoint_path
    with np.load(latest) as npz:
        arrays = dict(npz)
    damage(arrays)
    with open(latest, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ConfigError, match="is corrupt") as err:
        run(tiny_config, datasets=tiny)
    assert message in str(err.value)
    fresh = run(tiny_config.replace(overwrite=True), datasets=tiny)
    assert fresh.metrics["resumed_from"] is None


def test_a_full_disk_in_tensorflow_is_a_volume_error_not_out_of_memory():
    from job.runner import _explain

    err = tf.errors.ResourceExhaustedError(
        None, None, "/out/saved_model.tmp/variables/x.data; No space left on device"
    )
    explained = _explain(err)
    assert isinstance(explained, ConfigError) and explained.exit_code == 2
    assert str(explained).startswith("No space left on device (TensorFlow writing a file)")
    assert "out of memory" in str(_explain(tf.errors.ResourceExhaustedError(None, None, "OOM")))


def test_a_full_disk_is_one_error_and_the_rerun_resumes(tiny, tiny_config, monkeypatch):
    from job import checkpoint

    real_savez, saved = checkpoint.np.savez, []

    def savez_until_the_disk_fills(file, **arrays):
        if saved:  # the second checkpoint (epoch 2) finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(file, **arrays)
        saved.append(file)

    monkeypatch.setattr(checkpoint.np, "savez", savez_until_the_disk_fills)
    with pytest.raises(ConfigError, match=r"^No space left on device: .*rerun") as err:
        run(tiny_config, datasets=tiny)
    assert err.value.exit_code == 2
    monkeypatch.setattr(checkpoint.np, "savez", real_savez)  # room made
    resumed = run(tiny_config, datasets=tiny)
    assert resumed.metrics["resumed_from"] == {"epoch": 1, "step": 0}
    assert [record["epoch"] for record in resumed.metrics["history"]] == [1, 2]


def test_temporaries_left_by_a_killed_write_are_cleared_by_the_next_one(tiny, tiny_config):
    cut_short_after_one_epoch(tiny_config, tiny)
    checkpoints = tiny_config.checkpoint_path.parent
    left = checkpoints / ".latest.npz.k1lled" / "latest.npz"  # as kill -9 mid-write leaves it
    left.parent.mkdir()
    left.write_bytes(b"half a checkpoint")
    run(tiny_config, datasets=tiny)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.npz"]


def test_a_diverging_run_is_exit_2_and_saves_nothing_of_it(tiny, tiny_config):
    with pytest.raises(Diverged, match=r"the loss became nan .*Lower --learning-rate") as err:
        run(tiny_config.replace(learning_rate=1e30), datasets=tiny)
    assert err.value.exit_code == 2  # the same settings diverge again: no retry
    assert not tiny_config.checkpoint_path.exists()  # no NaN weights to resume from
    assert not tiny_config.metrics_path.exists()


def nan_loss(trainer, *args):
    return float("nan"), 0.0, False


def nan_weights_behind_a_finite_loss(trainer, *args):
    """As when the chunk's last step overflows the gradients."""
    kernel = trainer.model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    return 1.0, 0.0, False


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (nan_loss, "the loss became nan in epoch 2"),
        (nan_weights_behind_a_finite_loss, "the weights became NaN or infinite in epoch 2"),
    ],
)
def test_divergence_leaves_the_last_checkpoint_as_it_was(
    tiny, tiny_config, monkeypatch, chunk, message
):
    from job.loop import Trainer

    cut_short_after_one_epoch(tiny_config, tiny)
    before = tiny_config.checkpoint_path.read_bytes()
    monkeypatch.setattr(Trainer, "run_chunk", chunk)
    with pytest.raises(Diverged, match=message):
        run(tiny_config, datasets=tiny)
    assert tiny_config.checkpoint_path.read_bytes() == before
    monkeypatch.undo()
    resumed = run(tiny_config, datasets=tiny)
    assert resumed.metrics["resumed_from"] == {"epoch": 1, "step": 0}
