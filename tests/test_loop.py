"""job.loop: the epoch order, where chunks stop, an epoch's record, and the
Trainer itself on tiny data (no runner, no files)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from job import loop
from job.checkpoint import TrainState
from job.loop import (
    MAX_CHUNK_STEPS,
    Evaluation,
    NotFinite,
    Trainer,
    chunk_stop,
    epoch_order,
    epoch_record,
)
from job.runner import run

# -- epoch_order -------------------------------------------------------------------


def test_epoch_order_depends_only_on_seed_and_epoch():
    # A resumed run recomputes the order of the epoch it resumes in.
    assert np.array_equal(epoch_order(7, 3, 1000, 32), epoch_order(7, 3, 1000, 32))


def test_epoch_order_differs_between_epochs_and_seeds():
    first = epoch_order(7, 0, 1000, 32)
    assert not np.array_equal(first, epoch_order(7, 1, 1000, 32))
    assert not np.array_equal(first, epoch_order(8, 0, 1000, 32))


def test_epoch_order_is_steps_by_batch_and_skips_the_remainder():
    order = epoch_order(0, 0, 103, 10)
    assert order.shape == (10, 10)
    assert order.dtype == np.int32
    # Every row at most once in an epoch, and only rows that exist.
    assert len(np.unique(order)) == order.size
    assert order.min() >= 0 and order.max() < 103


def test_epoch_order_skips_a_different_remainder_each_epoch():
    def skipped(epoch):
        return set(range(103)) - set(epoch_order(0, epoch, 103, 10).ravel().tolist())

    assert len(skipped(0)) == len(skipped(1)) == 3
    assert skipped(0) != skipped(1)


# -- chunk_stop ----------------------------------------------------------------------


def test_a_chunk_runs_to_the_epochs_end_when_nothing_stops_it_sooner():
    assert chunk_stop(0, 10, 0, None) == 10
    assert chunk_stop(3, 10, 23, None) == 10


def test_a_chunk_is_at_most_max_chunk_steps():
    steps = 3 * MAX_CHUNK_STEPS
    assert chunk_stop(0, steps, 0, None) == MAX_CHUNK_STEPS
    assert chunk_stop(100, steps, 100, None) == 100 + MAX_CHUNK_STEPS


def test_a_chunk_stops_at_the_next_checkpoint_boundary_in_global_steps():
    assert chunk_stop(0, 10, 0, 4) == 4
    assert chunk_stop(4, 10, 4, 4) == 8  # starting on a boundary: on to the next
    # Epoch 2 of 10 steps starts at global step 10: the boundary is global 12.
    assert chunk_stop(0, 10, 10, 4) == 2
    # A boundary beyond the epoch's end does not carry the chunk past it.
    assert chunk_stop(0, 10, 0, 25) == 10
    assert chunk_stop(0, 10, 0, 0) == 10  # 0: no --checkpoint-every


@pytest.mark.parametrize(
    ("steps", "checkpoint_every"),
    [(10, None), (10, 4), (10, 3), (7, 10), (2 * MAX_CHUNK_STEPS + 5, 300)],
)
def test_chunks_cover_every_step_and_stop_at_every_boundary(steps, checkpoint_every):
    stops, global_step = [], 0
    for _ in range(3):  # epochs
        step = 0
        while step < steps:
            stop = chunk_stop(step, steps, global_step, checkpoint_every)
            assert step < stop <= min(steps, step + MAX_CHUNK_STEPS)
            global_step += stop - step
            step = stop
            stops.append(global_step)
        assert stops[-1] % steps == 0  # the epoch ends on a chunk's end
    assert global_step == 3 * steps
    if checkpoint_every:
        boundaries = range(checkpoint_every, 3 * steps + 1, checkpoint_every)
        assert set(boundaries) <= set(stops)


# -- epoch_record ---------------------------------------------------------------------


def validation(loss=0.25, accuracy=0.9) -> Evaluation:
    return Evaluation(loss, accuracy, np.full((4, 10), 0.1, np.float32))


def test_an_epochs_record_has_the_keys_metrics_json_and_tensorboard_read():
    record = epoch_record(3, 10, 32, 5.0, 160.0, 2.0, validation())
    assert record == {
        "epoch": 3,
        "loss": 0.5,  # mean over the steps
        "accuracy": 0.5,  # of the steps * global batch images
        "val_loss": 0.25,
        "val_accuracy": 0.9,
        "seconds": 2.0,
        "images_per_second": 160.0,
    }
    assert json.loads(json.dumps(record)) == record


def test_an_epoch_with_no_recorded_seconds_has_zero_images_per_second():
    # A resume from a checkpoint written before `seconds` was recorded.
    assert epoch_record(1, 10, 32, 5.0, 160.0, 0.0, validation())["images_per_second"] == 0.0


# -- Trainer on tiny data ----------------------------------------------------------------


class Split:
    """A split as the runner passes it: uint8 image and int32 label tensors."""

    def __init__(self, images, labels):
        import tensorflow as tf

        self.size = len(images)
        self.images = tf.constant(images, tf.uint8)
        self.labels = tf.constant(labels, tf.int32)


@pytest.fixture(scope="module")
def splits(tiny):
    return Split(tiny.x_train, tiny.y_train), Split(tiny.x_test, tiny.y_test)


BATCH = 32
STEPS = 320 // BATCH  # tests/tiny.py: 320 training images


def make_trainer(learning_rate: float = 1e-3, single_process: bool = True) -> Trainer:
    import tensorflow as tf

    from job.model import build_model, build_optimizer

    model = build_model((16,))
    optimizer = build_optimizer(learning_rate)
    optimizer.build(model.trainable_variables)
    return Trainer(
        model,
        optimizer,
        tf.distribute.get_strategy(),
        global_batch=BATCH,
        jit_compile=False,
        single_process=single_process,
    )


class Recorder:
    """The callbacks of fit(), keeping copies of the state each one was given."""

    def __init__(self, stop_after_chunks: int | None = None):
        self.checkpoints, self.epochs, self.chunk_losses = [], [], []
        self.stop_after_chunks = stop_after_chunks

    def on_checkpoint(self, state):
        self.checkpoints.append(replace(state, history=list(state.history)))

    def on_epoch_end(self, state, record):
        self.epochs.append(record)

    def on_chunk_end(self, state, mean_loss):
        self.chunk_losses.append(mean_loss)

    def stop_requested(self) -> bool:
        return self.stop_after_chunks is not None and (
            len(self.chunk_losses) >= self.stop_after_chunks
        )

    def fit(self, trainer, splits, state, epochs=2, checkpoint_every=None):
        train, test = splits
        return trainer.fit(
            train,
            test,
            state,
            epochs=epochs,
            seed=0,
            checkpoint_every=checkpoint_every,
            on_checkpoint=self.on_checkpoint,
            on_epoch_end=self.on_epoch_end,
            stop_requested=self.stop_requested,
            on_chunk_end=self.on_chunk_end,
        )


def test_fit_trains_every_epoch_and_checkpoints_at_every_boundary(splits):
    state = TrainState(steps_per_epoch=STEPS)
    calls = Recorder()
    assert calls.fit(make_trainer(), splits, state, epochs=2, checkpoint_every=4) is True
    # Every 4 global steps, and at each epoch's end (global steps 10 and 20).
    assert [s.global_step for s in calls.checkpoints] == [4, 8, 10, 12, 16, 20]
    assert [(s.epoch, s.step) for s in calls.checkpoints[-1:]] == [(2, 0)]
    assert [record["epoch"] for record in calls.epochs] == [1, 2]
    assert state.history == calls.epochs
    # Chunks [0,4) [4,8) [8,10), then [0,2) [2,6) [6,10) of epoch 2.
    assert len(calls.chunk_losses) == 6
    assert all(math.isfinite(loss) for loss in calls.chunk_losses)
    for record in calls.epochs:
        assert 0.0 <= record["accuracy"] <= 1.0 and record["images_per_second"] > 0


def test_fit_stops_after_a_checkpoint_when_asked_to(splits):
    state = TrainState(steps_per_epoch=STEPS)
    calls = Recorder(stop_after_chunks=1)
    assert calls.fit(make_trainer(), splits, state, checkpoint_every=4) is False
    # One process stops before its next chunk, and checkpoints where it stands.
    assert (state.epoch, state.step) == (0, 4)
    assert len(calls.chunk_losses) == 1
    assert calls.checkpoints[-1] == state
    assert calls.epochs == []


def test_several_workers_stop_together_one_chunk_later(splits):
    # Workers vote inside the chunk: the one in progress still runs to its end.
    state = TrainState(steps_per_epoch=STEPS)
    calls = Recorder(stop_after_chunks=0)
    trainer = make_trainer(single_process=False)
    assert calls.fit(trainer, splits, state, checkpoint_every=4) is False
    assert (state.epoch, state.step) == (0, 4)
    assert [s.global_step for s in calls.checkpoints] == [4]


def test_fit_raises_not_finite_and_checkpoints_nothing_when_training_diverges(splits):
    calls = Recorder()
    with pytest.raises(NotFinite, match="became"):
        calls.fit(make_trainer(learning_rate=1e30), splits, TrainState(steps_per_epoch=STEPS))
    assert calls.checkpoints == []  # the last good checkpoint stays as it was
    assert calls.epochs == []


def test_evaluate_returns_each_images_class_probabilities(splits, tiny):
    evaluation = make_trainer().evaluate(splits[1])
    probabilities = evaluation.probabilities
    assert probabilities.shape == (len(tiny.y_test), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    hits = probabilities.argmax(axis=1) == tiny.y_test
    assert evaluation.accuracy == pytest.approx(hits.mean())
    true_class = probabilities[np.arange(len(tiny.y_test)), tiny.y_test]
    assert evaluation.loss == pytest.approx(-np.log(true_class).mean(), rel=1e-4)


# -- memory XLA's compile freed ------------------------------------------------------


def test_released_once_after_the_first_compiled_chunk(tiny, tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "release_free_memory", lambda: calls.append(1))
    # 2 epochs of 10 steps in chunks of at most 4: six chunks, one compile.
    run(tiny_config.replace(epochs=2, checkpoint_every=4), datasets=tiny)
    assert calls == [1]
