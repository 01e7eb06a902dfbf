"""Adam for the training loop: Keras' Adam, each weight's update one fused op.

Keras 3's Adam writes each weight's update as ~15 `keras.ops` calls, and
tracing them (Python dispatch, dtype promotion) is a third of the training
step's tracing. TensorFlow's ResourceApplyAdam op computes the same update,
on its CPU and GPU kernels and under XLA:

    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m += (g - m) * (1 - beta_1);  v += (g^2 - v) * (1 - beta_2)
    w -= m * alpha / (sqrt(v) + epsilon)

The only difference is rounding: the op computes 1 - beta in float32, Keras in
float64, so weights differ from Keras' Adam in their last bits. Everything else
stays Keras': the slots (m, v, iterations), so checkpoints and the saved
model's optimizer state are the same; the gradients' all-reduce under a
distribution strategy; the learning rate.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam (without amsgrad) whose update step is one op."""

    def __init__(self, learning_rate: float):
        super().__init__(learning_rate=learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        # Under a distribution strategy Keras calls this once per replica's copy
        # of `variable`, inside strategy.extended.update, where a distributed
        # slot's `.handle` is that replica's copy.
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )
