#!/usr/bin/env python3
"""The seed script's training, exactly as written, for the benchmark.

Differences from the seed, none of which touch the training: data comes from
a local mnist.npz (the seed's download URL may be unreachable), the figure is
saved instead of shown (headless), and the timings and accuracy are printed as
one JSON line at the end. Usage: seed_baseline.py MNIST_NPZ OUT_PNG [EPOCHS]
"""

import json
import sys
import time

started = time.perf_counter()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

npz_path, png_path = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 5

with np.load(npz_path) as data:
    (X_train, y_train), (X_test, y_test) = (
        (data["x_train"], data["y_train"]),
        (data["x_test"], data["y_test"]),
    )
X_train, X_test = X_train / 255.0, X_test / 255.0

model = keras.Sequential(
    [
        layers.Flatten(input_shape=(28, 28)),
        layers.Dense(128, activation="relu"),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

fit_started = time.perf_counter()
model.fit(X_train, y_train, epochs=epochs, batch_size=32, validation_data=(X_test, y_test))
fit_seconds = time.perf_counter() - fit_started
test_loss, test_accuracy = model.evaluate(X_test, y_test, verbose=0)

num_images = 5
indices = np.random.choice(len(X_test), num_images)
plt.figure(figsize=(10, 4))
for i, idx in enumerate(indices):
    img = X_test[idx]
    true_label = y_test[idx]
    predicted_label = np.argmax(model.predict(img.reshape(1, 28, 28)))
    plt.subplot(1, num_images, i + 1)
    plt.imshow(img, cmap="gray")
    plt.axis("off")
    plt.title(f"Real: {true_label}\nPredicted: {predicted_label}")
plt.savefig(png_path)

print(
    json.dumps(
        {
            "fit_seconds": fit_seconds,
            "test_accuracy": float(test_accuracy),
            "train_images": epochs * len(X_train),
            "seconds": time.perf_counter() - started,
        }
    )
)
