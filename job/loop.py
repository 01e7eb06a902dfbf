"""The training loop: one path for every strategy, fast on one device.

Why not `model.fit`: Keras 3's fit does not work under
MultiWorkerMirroredStrategy, and on a small model its per-step overhead, not
arithmetic, dominates. Here one call of a compiled function runs a chunk of up
to MAX_CHUNK_STEPS steps over the training set held in memory as uint8:

- each epoch's shuffle is a [steps, global_batch] index matrix, computed from
  (seed, epoch) alone, so a resumed run sees exactly the batches it would have;
- each replica takes its own columns of that matrix (its share of the global
  batch) and gathers its rows inside the loop; no tf.data pipeline;
- pixels are scaled to [0, 1] in-graph, so no float copy of the data exists;
- gradients are all-reduced by the Keras optimizer under the strategy; the
  loss is summed per replica and divided by the global batch, so the update is
  the same as one device would make for the whole batch.

Per-step slicing with a moving start offset is slow under XLA; `tf.gather` of
one row of the index matrix per step is not, and loop bounds passed as tensors
do not trigger recompilation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from job.checkpoint import TrainState
from job.heap import release_free_memory
from job.profiler import StepProfiler

# Steps per compiled call, at most. Longer calls amortise the call overhead
# better, but a SIGTERM is only seen between calls: 512 steps take ~0.1 s on
# one CPU with XLA, ~2 s in the multi-worker graph path.
MAX_CHUNK_STEPS = 512


class NotFinite(Exception):
    """The loss or the weights became NaN or infinite. Raised before anything
    of that chunk is saved, so the last checkpoint still holds finite weights."""


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    probabilities: np.ndarray  # [n, 10]


def epoch_order(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Row indices of every batch of one epoch, [steps, batch_size] int32.

    Depends only on (seed, epoch): a resumed run recomputes the same order.
    The remainder (num_examples % batch_size) is skipped, a different part
    each epoch; every replica must take equal steps.
    """
    steps = num_examples // batch_size
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def chunk_stop(
    step: int, steps: int, global_step: int, checkpoint_every: int | None, breaks=()
) -> int:
    """Where a chunk that starts at `step` of an epoch of `steps` ends: at the
    epoch's end, after MAX_CHUNK_STEPS, at the next --checkpoint-every
    boundary (in global steps, `global_step` being where the chunk starts), or
    at the next of `breaks` (global steps), whichever is first."""
    stop = min(steps, step + MAX_CHUNK_STEPS)
    if checkpoint_every:
        stop = min(stop, step + checkpoint_every - global_step % checkpoint_every)
    ahead = [b - global_step for b in breaks if b > global_step]
    return min([stop, *(step + a for a in ahead)])


def epoch_record(
    epoch: int,
    steps: int,
    global_batch: int,
    loss_sum: float,
    correct: float,
    seconds: float,
    validation: Evaluation,
) -> dict:
    """What metrics.json's history and TensorBoard record of epoch `epoch`
    (1-based): `loss_sum` and `correct` are summed over its `steps` steps of
    `global_batch` images, `seconds` spent on them (across resumes)."""
    return {
        "epoch": epoch,
        "loss": loss_sum / steps,
        "accuracy": correct / (steps * global_batch),
        "val_loss": validation.loss,
        "val_accuracy": validation.accuracy,
        # The epoch's steps, in this process and any before a resume.
        "seconds": seconds,
        # 0 only after a resume from a checkpoint written before `seconds` was.
        "images_per_second": steps * global_batch / seconds if seconds else 0.0,
    }


class Trainer:
    """Runs epochs and chunks of steps; the runner decides what to save when."""

    def __init__(
        self,
        model,
        optimizer,
        strategy,
        global_batch: int,
        jit_compile: bool,
        single_process: bool = True,
    ):
        self.model = model
        # Several workers must stop at the same step, so they vote inside a
        # chunk, which acts on a SIGTERM one chunk late; one process stops at once.
        self.single_process = single_process
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch = global_batch
        replicas = strategy.num_replicas_in_sync
        self.per_replica_batch = global_batch // replicas
        with strategy.scope():
            self._loss_sum, self._correct = (
                tf.Variable(
                    0.0,
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM,
                )
                for _ in range(2)
            )
        # autograph=False: the loop is an explicit tf.while_loop, so AutoGraph's
        # source rewriting of these methods would only add ~0.12 s of tracing.
        self._train_chunk = tf.function(
            self._train_chunk_graph, jit_compile=jit_compile, autograph=False
        )
        # Evaluation is one forward pass per epoch: XLA would cost more to compile
        # (0.26 s) than it saves; as a plain graph it traces in 0.05 s.
        self._evaluate = tf.function(self._evaluate_graph, autograph=False)
        self._compiled = False

    # -- compiled parts ---------------------------------------------------------

    def _replica_step(self, images, labels, order, step):
        """One step on one replica: its share of row `step` of the epoch order."""
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        first = replica * self.per_replica_batch
        rows = tf.gather(order, step)[first : first + self.per_replica_batch]
        x = tf.cast(tf.gather(images, rows), tf.float32) / 255.0
        y = tf.gather(labels, rows)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = self.model(x, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(y, probabilities)
            loss = tf.reduce_sum(losses) / self.global_batch
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        hits = tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), y)
        # Replica-local sums, added up across replicas only when read.
        self._loss_sum.assign_add(loss)
        self._correct.assign_add(tf.reduce_sum(tf.cast(hits, tf.float32)))

    def _train_chunk_graph(self, images, labels, order, start, stop, stop_flag):
        # The loop stays outside strategy.run: the optimizer's gradient
        # all-reduce cannot sit inside control flow within a replica function.
        self._loss_sum.assign(0.0)
        self._correct.assign(0.0)

        def train_step(step):
            self.strategy.run(self._replica_step, args=(images, labels, order, step))
            return step + 1

        tf.while_loop(lambda step: step < stop, train_step, [start])
        # Any worker asked to stop -> all stop after this chunk, at the same step.
        stop_votes = self.strategy.run(lambda: stop_flag)
        return (
            self._loss_sum.read_value(),
            self._correct.read_value(),
            self.strategy.reduce("SUM", stop_votes, axis=None),
        )

    def _evaluate_graph(self, images, labels):
        probabilities = self.model(tf.cast(images, tf.float32) / 255.0, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        hits = tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), labels)
        return tf.reduce_mean(losses), tf.reduce_mean(tf.cast(hits, tf.float32)), probabilities

    # -- driver -------------------------------------------------------------------

    def run_chunk(self, data, order, start: int, stop: int, stop_requested: bool):
        """Train steps [start, stop) of an epoch; returns (loss_sum, correct, stop_all)."""
        loss_sum, correct, stop_all = self._train_chunk(
            data.images,
            data.labels,
            tf.convert_to_tensor(order),
            tf.constant(start, tf.int32),
            tf.constant(stop, tf.int32),
            tf.constant(1.0 if stop_requested else 0.0),
        )
        if not self._compiled:
            # The first call traced and compiled (or loaded) the step.
            self._compiled = True
            release_free_memory()
        return float(loss_sum), float(correct), bool(stop_all > 0)

    def _checkpoint(self, state: TrainState, on_checkpoint) -> None:
        # A chunk's last step can overflow the gradients while its loss is
        # still finite: never let NaN weights replace the last good checkpoint.
        # Every worker holds the same weights, so all of them stop here.
        if not all(np.isfinite(v.numpy()).all() for v in self.model.trainable_variables):
            # `state` already points past the chunk; after an epoch's last one,
            # to step 0 of the next epoch.
            if state.step:
                where = f"epoch {state.epoch + 1}, by step {state.step}"
            else:
                where = f"epoch {state.epoch}"
            raise NotFinite(f"the weights became NaN or infinite in {where}")
        on_checkpoint(state)

    def evaluate(self, data) -> Evaluation:
        loss, accuracy, probabilities = self._evaluate(data.images, data.labels)
        return Evaluation(float(loss), float(accuracy), probabilities.numpy())

    def _end_epoch(self, state: TrainState, test, on_checkpoint, on_epoch_end) -> None:
        """Validate, record the epoch in `state`, checkpoint, then tell the runner."""
        record = epoch_record(
            state.epoch + 1,
            state.steps_per_epoch,
            self.global_batch,
            state.loss_sum,
            state.correct,
            state.seconds,
            self.evaluate(test),
        )
        state.history.append(record)
        state.epoch, state.step, state.loss_sum, state.correct, state.seconds = (
            state.epoch + 1, 0, 0.0, 0.0, 0.0
        )  # fmt: skip
        self._checkpoint(state, on_checkpoint)
        on_epoch_end(state, record)

    def fit(
        self,
        train,
        test,
        state: TrainState,
        epochs: int,
        seed: int,
        checkpoint_every: int | None,
        on_checkpoint: Callable[[TrainState], None],
        on_epoch_end: Callable[[TrainState, dict], None],
        stop_requested: Callable[[], bool],
        on_chunk_end: Callable[[TrainState, float], None] | None = None,
        profiler: StepProfiler | None = None,
    ) -> bool:
        """Train until `epochs` are complete; False if stopped early (after a
        checkpoint), True when done; NotFinite if training diverges.
        `state` is updated in place. `on_chunk_end(state, mean_loss)` follows
        every compiled chunk of steps; `profiler` traces the steps it names."""
        profiler = profiler or StepProfiler(None, None)
        steps = state.steps_per_epoch
        while state.epoch < epochs:
            order = tf.constant(epoch_order(seed, state.epoch, train.size, self.global_batch))
            started, seconds_before = time.perf_counter(), state.seconds
            while state.step < steps:
                if self.single_process and stop_requested():
                    self._checkpoint(state, on_checkpoint)
                    return False
                stop = chunk_stop(
                    state.step, steps, state.global_step, checkpoint_every, profiler.breaks
                )
                profiler.chunk_starting(state.global_step)
                loss_sum, correct, stop_all = self.run_chunk(
                    train, order, state.step, stop, stop_requested()
                )
                if not math.isfinite(loss_sum):
                    # The loss is summed over all replicas: every worker stops here.
                    raise NotFinite(
                        f"the loss became {loss_sum} in epoch {state.epoch + 1}, by step {stop}"
                    )
                chunk_steps = stop - state.step
                state.step, state.loss_sum, state.correct, state.seconds = (
                    stop,
                    state.loss_sum + loss_sum,
                    state.correct + correct,
                    seconds_before + time.perf_counter() - started,
                )
                profiler.chunk_ended(state.global_step)
                if on_chunk_end is not None:
                    on_chunk_end(state, loss_sum / chunk_steps)
                if stop_all:
                    self._checkpoint(state, on_checkpoint)
                    return False
                if checkpoint_every and state.global_step % checkpoint_every == 0 and stop < steps:
                    self._checkpoint(state, on_checkpoint)
            self._end_epoch(state, test, on_checkpoint, on_epoch_end)
        return True
