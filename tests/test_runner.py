"""run() end to end on tiny data: the flow from set-up to the last artifact,
and how it ends when something stops it (SIGTERM, a full disk, divergence)."""

from __future__ import annotations

import errno
import gc
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from job import artifacts, checkpoint
from job.errors import ConfigError, Diverged
from job.runner import run
from job.summaries import Summaries
from tests.conftest import cut_short_after_one_epoch
from tests.events import image_tags, scalars


def test_a_single_process_run_reports_one_worker(finished_run):
    _, result = finished_run
    assert result.workers == 1


def test_tensorboard_has_per_epoch_scalars_and_the_prediction_panel(finished_run):
    config, _ = finished_run
    logs = config.output_dir / "tensorboard"
    for run_name in ("train", "validation"):
        found = scalars(logs / run_name)
        for tag in ("epoch_loss", "epoch_accuracy"):
            assert [step for step, _ in found[tag]] == [1, 2], (run_name, tag)
    assert "predictions" in image_tags(logs / "validation")


def test_run_leaves_the_garbage_collector_as_it_found_it(finished_run, tiny):
    # run() pauses the collector while TensorFlow starts up; a program that runs
    # several jobs in one process gets it back, whether the run finished or failed.
    config, _ = finished_run
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ConfigError):
        run(config, datasets=tiny)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_lost_connection_in_one_process_is_not_blamed_on_a_lost_worker(
    tiny, tiny_config, monkeypatch
):
    from job.loop import Trainer

    def unavailable(self, *args, **kwargs):
        raise tf.errors.UnavailableError(None, None, "connection reset")

    monkeypatch.setattr(Trainer, "fit", unavailable)
    with pytest.raises(tf.errors.UnavailableError, match="connection reset"):
        run(tiny_config, datasets=tiny)


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


def _denied_checkpoint(monkeypatch, config):
    def savez(file, **arrays):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), file.name)

    monkeypatch.setattr(checkpoint.np, "savez", savez)
    return "Permission denied writing", config.checkpoint_path


def _read_only_tensorboard(monkeypatch, config):
    events = config.tensorboard_path / "train" / "events.out.tfevents.1.host.2.v2"

    def flush(self):
        raise tf.errors.PermissionDeniedError(None, None, f"{events}; Read-only file system")

    monkeypatch.setattr(Summaries, "flush", flush)
    return "Read-only file system (TensorFlow writing", events


def _read_only_saved_model(monkeypatch, config):
    def export(model, path, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, f"{path}; Read-only file system")

    monkeypatch.setattr(keras.Model, "export", export)
    return "Read-only file system (TensorFlow writing", config.saved_model_path


def _read_only_png(monkeypatch, config):
    real = artifacts.write_bytes

    def write_bytes(target, data):
        if target.suffix == ".png":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        real(target, data)

    monkeypatch.setattr(artifacts, "write_bytes", write_bytes)
    return "Read-only file system writing", config.output_dir / "predictions.png"


def _forbidden_metrics(monkeypatch, config):
    def write_json(target, obj):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(target))

    monkeypatch.setattr(artifacts, "write_json", write_json)
    return "Operation not permitted writing", config.metrics_path


@pytest.mark.parametrize(
    "fail",
    [
        _denied_checkpoint,
        _read_only_tensorboard,
        _read_only_saved_model,
        _read_only_png,
        _forbidden_metrics,
    ],
    ids=["checkpoint", "tensorboard", "saved_model", "png", "metrics"],
)
def test_a_volume_that_turns_unwritable_mid_run_is_one_line_exit_2(
    tiny, tiny_config, monkeypatch, fail
):
    cut_short_after_one_epoch(tiny_config, tiny)
    before = tiny_config.checkpoint_path.read_bytes()
    reason, target = fail(monkeypatch, tiny_config)
    with pytest.raises(ConfigError) as err:
        run(tiny_config, datasets=tiny)
    message = str(err.value)
    assert err.value.exit_code == 2  # Kubernetes fails the Job rather than retry
    assert message.startswith(f"{reason} {target}") and "\n" not in message, message
    assert "written before are intact" in message
    assert not tiny_config.metrics_path.exists()
    if fail is _denied_checkpoint:  # the epoch-1 checkpoint is still the one on disk
        assert tiny_config.checkpoint_path.read_bytes() == before
