"""The seed's multi-layer perceptron, with its width configurable."""

from __future__ import annotations

import keras

from job.data import IMAGE_SHAPE, NUM_CLASSES


def build_model(hidden_units: tuple[int, ...] = (128, 64)) -> keras.Sequential:
    """Flatten(28x28) -> Dense(relu) per hidden layer -> Dense(10, softmax).

    With the default (128, 64) this is exactly the seed's model: 109,386
    parameters. Inputs are float images scaled to [0, 1].
    """
    layers = [keras.Input(shape=IMAGE_SHAPE, name="image"), keras.layers.Flatten()]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden_units]
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax"))
    return keras.Sequential(layers, name="mnist_mlp")


def build_optimizer(learning_rate: float) -> keras.optimizers.Adam:
    return keras.optimizers.Adam(learning_rate=learning_rate)


def compile_for_users(model: keras.Model, learning_rate: float) -> None:
    """Compile the saved model as the seed did, so that a user who loads
    model.keras can call evaluate() and fit() without any setup."""
    model.compile(
        optimizer=build_optimizer(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
