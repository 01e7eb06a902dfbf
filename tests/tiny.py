"""Tiny, learnable stand-in for MNIST, for fast tests with no network.

Each class is a bright horizontal bar at its own height plus noise, so a few
hundred images are enough for the MLP to learn something measurable.
"""

from __future__ import annotations

import numpy as np

from job.data import Mnist


def tiny_mnist(n_train: int = 320, n_test: int = 80, seed: int = 0) -> Mnist:
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            row = 3 + 2 * int(label)
            image[row : row + 2, 4:24] = 255
        return images, labels

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Mnist(x_train, y_train, x_test, y_test)
