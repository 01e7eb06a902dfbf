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
        "AIP_TENSORBOARD_LOG_DIR": "gs://bucket/logs/",  # Vertex AI gives URIs
        "SM_CHANNEL_TRAINING": str(tmp_path / "data"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "sm-out"),
    }
    options = apply_platform_env({"model_dir": None, "output_dir": Path("flag")}, environ)
    assert options["model_dir"] == tmp_path / "model"
    assert options["saved_model_at_top"] is True  # where Vertex AI imports a model from
    assert options["checkpoint_dir"] == tmp_path / "ckpt"
    assert options["tensorboard_dir"] == "gs://bucket/logs"
    assert options["data_dir"] == tmp_path / "data"
    assert options["output_dir"] == Path("flag")  # the flag wins over SM_OUTPUT_DATA_DIR


def test_vertex_ai_uris_and_fuse_paths_are_the_same_bucket():
    built = from_options({}, {"AIP_MODEL_DIR": "gs://b/model", "AIP_CHECKPOINT_DIR": "/gcs/b/ckpt"})
    assert built.model_dir == "gs://b/model"
    assert built.checkpoint_dir == "gs://b/ckpt"  # written through the API: FUSE has no rename
    assert built.saved_model_at_top


def test_sagemaker_checkpoints_go_where_it_syncs_them(tmp_path):
    built = from_options({}, {"SM_MODEL_DIR": str(tmp_path / "model")})
    assert built.checkpoint_dir == Path("/opt/ml/checkpoints")
    assert not built.saved_model_at_top
    flagged = from_options({"checkpoint_dir": tmp_path / "c"}, {"SM_MODEL_DIR": "/opt/ml/model"})
    assert flagged.checkpoint_dir == tmp_path / "c"


@pytest.mark.parametrize(
    ("value", "message"),
    [("ftp://host/x", "only local paths, gs:// and s3://"), ("s3:///x", "no bucket name")],
)
def test_other_uris_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(output_dir=value)


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
