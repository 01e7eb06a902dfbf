from __future__ import annotations

import numpy as np

from job.model import build_model


def test_default_model_is_the_seeds_mlp():
    model = build_model()
    assert model.count_params() == 109_386
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "Flatten",
        "Dense",
        "Dense",
        "Dense",
    ]
    assert [layer.units for layer in model.layers[1:]] == [128, 64, 10]
    probabilities = model.predict(np.zeros((2, 28, 28), np.float32), verbose=0)
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_hidden_units_set_the_layers():
    model = build_model((32,))
    assert [layer.units for layer in model.layers[1:]] == [32, 10]
