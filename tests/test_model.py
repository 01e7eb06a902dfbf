from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from job.errors import ConfigError
from job.model import build_model, load_model, model_file
from tests.conftest import ROOT


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


def test_model_file_takes_an_output_dir_or_the_file(tmp_path):
    assert model_file(tmp_path) == tmp_path / "model.keras"
    assert model_file(tmp_path / "other.keras") == tmp_path / "other.keras"


def test_a_wrong_model_path_fails_before_tensorflow_loads():
    code = (
        "import sys\n"
        "from job.model import load_model\n"
        "from job.errors import ConfigError\n"
        "try:\n"
        "    load_model('no/such/model.keras')\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.splitlines() == [
        "no model at no/such/model.keras: pass --model a model.keras file or an output dir "
        "of `mnist-job train`",
        "False False",
    ]


def test_a_model_for_other_data_is_refused(tmp_path):
    import keras

    other = keras.Sequential([keras.Input(shape=(32, 32)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])  # fmt: skip
    other.save(tmp_path / "model.keras")
    with pytest.raises(ConfigError, match=r"maps \(32, 32\) to 10 classes, not \(28, 28\)"):
        load_model(tmp_path)
