"""The seed's multi-layer perceptron, with its width configurable, and loading
the model a run saved.

Keras is imported inside each function, so that a command can check a path
before it pays for importing TensorFlow (~3.5 s).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from job.config import IMAGE_SHAPE, MODEL_FILENAME, NUM_CLASSES
from job.errors import ConfigError

if TYPE_CHECKING:
    import keras


def build_model(hidden_units: tuple[int, ...] = (128, 64)) -> keras.Sequential:
    """Flatten(28x28) -> Dense(relu) per hidden layer -> Dense(10, softmax).

    With the default (128, 64) this is exactly the seed's model: 109,386
    parameters. Inputs are float images scaled to [0, 1].
    """
    import keras

    layers = [keras.Input(shape=IMAGE_SHAPE, name="image"), keras.layers.Flatten()]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden_units]
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax"))
    return keras.Sequential(layers, name="mnist_mlp")


def build_optimizer(learning_rate: float) -> keras.optimizers.Adam:
    """The training loop's Adam (job/optimizer.py: Keras' Adam, a faster trace)."""
    from job.optimizer import FusedAdam

    return FusedAdam(learning_rate=learning_rate)


def compile_for_users(model: keras.Model, learning_rate: float) -> None:
    """Compile the saved model as the seed did, so that a user who loads
    model.keras can call evaluate() and fit() without any setup."""
    import keras

    model.compile(
        # Keras' own class: loading model.keras must not need this package.
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def model_file(path: Path) -> Path:
    """A model.keras path, or an output dir holding one -> the model.keras path."""
    path = Path(path)
    return path / MODEL_FILENAME if path.is_dir() else path


def load_model(path: Path):
    """Load a model that `mnist-job train` saved (`path`: the file or its dir).

    ConfigError (exit 2) if there is none or it is not a 28x28 -> 10 digits
    Keras model. Checks the path before importing TensorFlow, so that a wrong
    path fails at once.
    """
    target = model_file(path)
    if not target.is_file():
        raise ConfigError(
            f"no model at {target}: pass --model a model.keras file or an output dir "
            "of `mnist-job train`"
        )
    if target.suffix == ".keras" and not zipfile.is_zipfile(target):
        # Keras would say "File not found" of a file that is right there.
        raise ConfigError(
            f"cannot load model {target}: not a complete .keras file (truncated or corrupt); "
            "train again, or copy it again from where it was written"
        )
    import keras

    try:
        model = keras.saving.load_model(target, compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load model {target}: {reason}") from None
    if tuple(model.input_shape[1:]) != IMAGE_SHAPE or model.output_shape[-1] != NUM_CLASSES:
        raise ConfigError(
            f"model {target} maps {model.input_shape[1:]} to {model.output_shape[-1]} classes, "
            f"not {IMAGE_SHAPE} images to {NUM_CLASSES} digits"
        )
    return model
