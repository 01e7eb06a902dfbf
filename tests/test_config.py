from __future__ import annotations

from pathlib import Path

import pytest

from job.config import DEFAULTS, TrainConfig
from job.errors import ConfigError, ExitCode


def test_defaults_are_the_seeds():
    assert (DEFAULTS.epochs, DEFAULTS.batch_size, DEFAULTS.learning_rate) == (5, 32, 1e-3)
    assert DEFAULTS.hidden_units == (128, 64)
    assert DEFAULTS.num_images == 5
    assert DEFAULTS.output_dir == Path("outputs")


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"learning_rate": 0.0},
        {"hidden_units": ()},
        {"max_train_samples": 0},
        {"num_images": -1},
        {"num_images": 101},
        {"learning_rate": float("inf")},
        {"learning_rate": float("nan")},
        {"seed": -1},
        {"seed": 2**32},
        {"worker_port": 0},
        {"worker_port": 65536},
        {"strategy": "tpu"},
        {"device": "npu"},
    ],
)
def test_invalid_values_raise_config_error(changes):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**changes)
    assert err.value.exit_code == ExitCode.USAGE
    assert "--" in str(err.value)  # names the option


def test_platform_dirs_redirect_artifacts(tmp_path):
    config = TrainConfig(
        output_dir=tmp_path / "out",
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        tensorboard_dir=tmp_path / "tb",
    )
    assert config.model_path == tmp_path / "model" / "model.keras"
    assert config.saved_model_path == tmp_path / "model" / "saved_model"
    assert config.checkpoint_path.parent == tmp_path / "ckpt"
    assert config.tensorboard_path == tmp_path / "tb"
    assert config.metrics_path == tmp_path / "out" / "metrics.json"
