from __future__ import annotations

from pathlib import Path

import pytest

from job import config
from job.config import DEFAULTS, TrainConfig, apply_platform_env, from_options, resolve_data_dir
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


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.default_data_dir() == tmp_path / "xdg" / "mnist-job"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.default_data_dir() == tmp_path / "home" / ".cache" / "mnist-job"


def test_platform_env_fills_unset_options_and_flags_win(tmp_path):
    environ = {
        "AIP_MODEL_DIR": str(tmp_path / "model"),
        "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "AIP_TENSORBOARD_LOG_DIR": "gs://bucket/logs",  # a URI is not a local path
        "SM_CHANNEL_TRAINING": str(tmp_path / "data"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "sm-out"),
    }
    options = apply_platform_env({"model_dir": None, "output_dir": Path("flag")}, environ)
    assert options["model_dir"] == tmp_path / "model"
    assert options["checkpoint_dir"] == tmp_path / "ckpt"
    assert "tensorboard_dir" not in options
    assert options["data_dir"] == tmp_path / "data"
    assert options["output_dir"] == Path("flag")  # the flag wins over SM_OUTPUT_DATA_DIR


def test_from_options_reads_platform_variables_and_no_compile_cache(tmp_path):
    environ = {"SM_MODEL_DIR": str(tmp_path / "sm-model"), "AIP_MODEL_DIR": ""}
    built = from_options({"epochs": 2, "output_dir": None, "no_compile_cache": True}, environ)
    assert built.epochs == 2
    assert built.model_dir == tmp_path / "sm-model"  # an empty AIP_MODEL_DIR is no setting
    assert built.output_dir == DEFAULTS.output_dir  # None: the default
    assert built.compile_cache is None
    assert from_options({"no_compile_cache": False}, {}).compile_cache is None  # off by default
    asked = from_options({"compile_cache": tmp_path / "xla", "no_compile_cache": False}, {})
    assert asked.compile_cache == tmp_path / "xla"


def test_every_command_finds_mnist_where_train_does(tmp_path):
    channel = {"SM_CHANNEL_TRAINING": str(tmp_path / "channel")}
    assert resolve_data_dir(None, channel) == tmp_path / "channel"
    assert resolve_data_dir(tmp_path / "flag", channel) == tmp_path / "flag"
    assert resolve_data_dir(None, {}) == DEFAULTS.data_dir
