"""job.optimizer: FusedAdam makes Keras' Adam update, with Keras' slots, on
one device and under a distribution strategy."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.optimizer import FusedAdam
from tests.conftest import ROOT


def trained(optimizer_class, jit_compile: bool, steps: int = 20) -> tuple[np.ndarray, list]:
    """A 784x128 weight after `steps` updates with fixed gradients of many scales."""
    rng = np.random.default_rng(0)
    weight = keras.Variable(rng.normal(size=(784, 128)).astype(np.float32))
    gradients = [
        (rng.normal(size=(784, 128)) * 10 ** rng.uniform(-4, 0)).astype(np.float32)
        for _ in range(steps)
    ]
    optimizer = optimizer_class(learning_rate=1e-3)
    optimizer.build([weight])

    @tf.function(jit_compile=jit_compile)
    def step(gradient):
        optimizer.apply_gradients([(gradient, weight)])

    for gradient in gradients:
        step(tf.constant(gradient))
    return weight.numpy(), [v.numpy() for v in optimizer.variables]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_update_is_keras_adams_up_to_rounding(jit_compile):
    fused, fused_slots = trained(FusedAdam, jit_compile)
    reference, reference_slots = trained(keras.optimizers.Adam, jit_compile)
    # 20 steps of lr 1e-3 move each weight by up to ~0.02; the two differ by
    # float32 rounding only (1 - beta in float32 here, in float64 in Keras).
    np.testing.assert_allclose(fused, reference, rtol=0, atol=2e-6)
    assert not np.array_equal(fused, trained(FusedAdam, jit_compile, steps=19)[0])
    for mine, theirs in zip(fused_slots, reference_slots, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_its_state_is_keras_adams_so_checkpoints_are_interchangeable():
    weight = keras.Variable(np.zeros((3, 2), np.float32))
    fused, reference = FusedAdam(learning_rate=1e-3), keras.optimizers.Adam(learning_rate=1e-3)
    fused.build([weight])
    reference.build([weight])
    assert [(v.name, v.shape) for v in fused.variables] == [
        (v.name, v.shape) for v in reference.variables
    ]


def test_under_a_mirrored_strategy_each_replica_updates_its_copy():
    """Two CPU replicas (a fresh process: logical devices are fixed at start-up)
    end with the same weights as one device given their summed gradient."""
    code = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from job.optimizer import FusedAdam

def one_device():
    weight = keras.Variable(np.ones((4, 3), np.float32))
    optimizer = FusedAdam(learning_rate=0.1)
    optimizer.build([weight])
    for _ in range(3):
        optimizer.apply_gradients([(tf.fill((4, 3), 2.0), weight)])
    return weight.numpy()

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    weight = keras.Variable(np.ones((4, 3), np.float32))
    optimizer = FusedAdam(learning_rate=0.1)
    optimizer.build([weight])

@tf.function
def step():
    def replica_step():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # 0.5 and 1.5: their sum, all-reduced, is the one device's gradient.
        gradient = tf.fill((4, 3), tf.cast(replica, tf.float32) + 0.5)
        optimizer.apply_gradients([(gradient, weight)])
    strategy.run(replica_step)

for _ in range(3):
    step()
copies = [v.numpy() for v in weight.value.values]
print(len(copies), all(np.array_equal(c, copies[0]) for c in copies))
print(np.abs(copies[0] - one_device()).max() < 1e-6, float(copies[0][0, 0]) < 1.0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["2 True", "True True"]
