"""Checkpoints: the file, its fingerprint of the settings, and resuming from
it (or refusing to) through run() on tiny data."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from job import checkpoint
from job.checkpoint import TrainState
from job.errors import ConfigError, ExitCode, JobError
from job.runner import run
from tests.conftest import cut_short_after_one_epoch
from tests.events import scalars

RECORD = {"epoch": 1, "loss": 0.5, "accuracy": 0.875, "val_loss": 0.25, "val_accuracy": 0.9,
          "seconds": 1.5, "images_per_second": 213.3}  # fmt: skip
WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
OPTIMIZER_VALUES = [np.array(7, np.int64), np.zeros((2, 3), np.float32)]


def a_state(**changes) -> TrainState:
    return TrainState(**{"epoch": 1, "step": 3, "steps_per_epoch": 5, "loss_sum": 1.5,
                         "correct": 12.0, "seconds": 0.25, "history": [RECORD],
                         "fingerprint": {"seed": 0}, **changes})  # fmt: skip


def test_save_then_load_gives_back_every_array_and_counter(tmp_path):
    path = tmp_path / "checkpoints" / "latest.npz"
    weights, optimizer_values, state = WEIGHTS, OPTIMIZER_VALUES, a_state()
    checkpoint.save(path, weights, optimizer_values, state)
    loaded_weights, loaded_optimizer, loaded_state = checkpoint.load(path)
    for saved, loaded in zip(weights + optimizer_values, loaded_weights + loaded_optimizer,
                             strict=True):  # fmt: skip
        np.testing.assert_array_equal(saved, loaded)
    assert loaded_state == state and loaded_state.global_step == 8


def test_no_checkpoint_is_none_and_an_unreadable_one_is_worth_a_retry(tmp_path, monkeypatch):
    assert checkpoint.load(tmp_path / "latest.npz") is None
    (tmp_path / "file").write_text("")
    assert checkpoint.load(tmp_path / "file" / "latest.npz") is None  # as Path.exists() says
    path = tmp_path / "latest.npz"
    checkpoint.save(path, WEIGHTS, OPTIMIZER_VALUES, a_state())

    def failing_disk(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "open", failing_disk, raising=False)
    with pytest.raises(JobError, match=r"could not be read .*Input/output error") as err:
        checkpoint.load(path)
    assert err.value.exit_code == ExitCode.FAILURE


def _directory(path):
    path.mkdir()


def _symlink_loop(path):
    path.symlink_to(path)  # it was taken for no checkpoint: the run silently started over


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_directory, "Is a directory"), (_symlink_loop, "Too many levels of symbolic links")],
)
def test_a_checkpoint_path_that_is_no_file_is_corrupt_not_absent(tmp_path, make, reason):
    path = tmp_path / "latest.npz"
    make(path)
    with pytest.raises(ConfigError, match=f"is corrupt \\({reason}\\)") as err:
        checkpoint.load(path)
    assert err.value.exit_code == ExitCode.USAGE  # a retry would find the same


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"steps_per_epoch": 0, "step": 0}, "bad counters"),  # ZeroDivisionError at the epoch's end
        ({"loss_sum": float("nan")}, "bad running sums"),  # NaN reached metrics.json
        ({"seconds": float("inf")}, "bad running sums"),
        ({"correct": -1.0}, "bad running sums"),
        ({"epoch": 2}, "bad history: not one record for each of 2 epochs"),
        ({"history": [{"epoch": 1}]}, "bad history record for epoch 1"),
        ({"history": [{**RECORD, "note": 1.0}]}, "bad history record for epoch 1"),
        ({"history": [{**RECORD, "loss": "0.5"}]}, "bad history record for epoch 1"),
        ({"history": [{**RECORD, "val_loss": float("nan")}]}, "bad history record for epoch 1"),
        ({"history": [{**RECORD, "epoch": 2}]}, "bad history record for epoch 1"),
        ({"history": [{**RECORD, "epoch": True}]}, "bad history record for epoch 1"),
    ],
)
def test_a_state_that_would_crash_or_reach_metrics_json_as_junk_is_corrupt(
    tmp_path, changes, reason
):
    path = tmp_path / "latest.npz"
    checkpoint.save(path, WEIGHTS, OPTIMIZER_VALUES, a_state(**changes))  # NaN saved as NaN
    with pytest.raises(ConfigError, match="is corrupt") as err:
        checkpoint.load(path)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("weight", "reason"),
    [
        (np.full((2, 3), "x"), "weight 0 has dtype <U1, the model's float32"),  # was a ValueError
        (np.full((2, 3), np.nan, np.float32), "weight 0 is not finite"),
        (np.zeros((2, 3), np.float64), "weight 0 has dtype float64, the model's float32"),
    ],
)
def test_arrays_of_the_right_shape_but_not_what_the_model_holds_are_corrupt(
    tmp_path, weight, reason
):
    model = [SimpleNamespace(shape=np.shape(w), dtype="float32") for w in WEIGHTS]
    optimizer = [SimpleNamespace(shape=np.shape(v), dtype=v.dtype.name) for v in OPTIMIZER_VALUES]
    checkpoint.check_fits(WEIGHTS, model, OPTIMIZER_VALUES, optimizer, tmp_path)
    with pytest.raises(ConfigError, match="is corrupt") as err:
        checkpoint.check_fits([weight, WEIGHTS[1]], model, OPTIMIZER_VALUES, optimizer, tmp_path)
    assert reason in str(err.value)


def test_steps_per_epoch_other_than_the_runs_is_corrupt(tiny_config):
    fingerprint = checkpoint.fingerprint(tiny_config, train_size=320)
    state = a_state(epoch=0, step=3, history=[], fingerprint=fingerprint)  # 5 steps, not 10
    checkpoint.save(tiny_config.checkpoint_path, WEIGHTS, OPTIMIZER_VALUES, state)
    with pytest.raises(ConfigError, match=r"is corrupt \(5 steps per epoch, not 10\)"):
        checkpoint.restore(tiny_config, None, None, 10, train_size=320, fresh=False)


def test_the_fingerprint_names_every_setting_that_changes_the_run(tiny_config):
    fingerprint = checkpoint.fingerprint(tiny_config, train_size=320)
    assert set(fingerprint) == {"hidden_units", "batch_size", "learning_rate", "seed", "train_size"}
    saved = TrainState(fingerprint=fingerprint)
    checkpoint.check_compatible(saved, fingerprint, tiny_config.checkpoint_path)
    changed = checkpoint.fingerprint(tiny_config.replace(seed=1), train_size=320)
    with pytest.raises(ConfigError, match="seed 0 -> 1"):
        checkpoint.check_compatible(saved, changed, tiny_config.checkpoint_path)


def test_resumes_from_checkpoint_without_retraining(tmp_path, tiny, tiny_config):
    first = cut_short_after_one_epoch(tiny_config, tiny)
    assert set(first.metrics["history"][0]) == checkpoint.RECORD_KEYS  # what load() accepts
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


def _string_weight(arrays):
    arrays["weight_0"] = np.full(arrays["weight_0"].shape, "x")


def _nan_loss_sum(arrays):
    state = json.loads(str(arrays["state"]))
    arrays["state"] = np.array(json.dumps({**state, "loss_sum": float("nan")}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_last_weight, "5 weight arrays, the model has 6"),
        (_cut_first_weight, "weight 0 has shape (100, 128), the model's (784, 128)"),
        (_bad_counter, "bad counters"),
        (_string_weight, "weight 0 has dtype <U1, the model's float32"),
        (_nan_loss_sum, "bad running sums: (nan, "),
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


def test_temporaries_left_by_a_killed_write_are_cleared_by_the_next_one(tiny, tiny_config):
    cut_short_after_one_epoch(tiny_config, tiny)
    checkpoints = tiny_config.checkpoint_path.parent
    # As kill -9 mid-write leaves it: named for its writer, a process now gone.
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    owner = f"{socket.gethostname()}.{killed.stdout.strip()}.k1lled"
    left = checkpoints / f".latest.npz.{owner}" / "latest.npz"
    left.parent.mkdir()
    left.write_bytes(b"half a checkpoint")
    run(tiny_config, datasets=tiny)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.npz"]
