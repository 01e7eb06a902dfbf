"""Checkpoints: the file, its fingerprint of the settings, and resuming from
it (or refusing to) through run() on tiny data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from job import checkpoint
from job.checkpoint import TrainState
from job.errors import ConfigError, ExitCode, JobError
from job.runner import run
from tests.conftest import cut_short_after_one_epoch
from tests.events import scalars


def test_save_then_load_gives_back_every_array_and_counter(tmp_path):
    path = tmp_path / "checkpoints" / "latest.npz"
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    optimizer_values = [np.array(7, np.int64), np.zeros((2, 3), np.float32)]
    state = TrainState(epoch=1, step=3, steps_per_epoch=5, loss_sum=1.5, correct=12.0,
                       seconds=0.25, history=[{"epoch": 1}], fingerprint={"seed": 0})  # fmt: skip
    checkpoint.save(path, weights, optimizer_values, state)
    loaded_weights, loaded_optimizer, loaded_state = checkpoint.load(path)
    for saved, loaded in zip(weights + optimizer_values, loaded_weights + loaded_optimizer,
                             strict=True):  # fmt: skip
        np.testing.assert_array_equal(saved, loaded)
    assert loaded_state == state and loaded_state.global_step == 8


def test_no_checkpoint_is_none_and_an_unreadable_one_is_worth_a_retry(tmp_path):
    assert checkpoint.load(tmp_path / "latest.npz") is None
    (tmp_path / "dir.npz").mkdir()  # reading it fails with an I/O error, not bad bytes
    with pytest.raises(JobError, match="could not be read") as err:
        checkpoint.load(tmp_path / "dir.npz")
    assert err.value.exit_code == ExitCode.FAILURE


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
