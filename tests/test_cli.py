"""The command line as users and Kubernetes meet it: help, validation, exit codes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import error_lines, run_job, run_tiny_job


def test_help_is_fast_and_does_not_import_tensorflow():
    code = (
        "import sys, time; t = time.perf_counter(); from job.cli import main; "
        "sys.argv = ['mnist-job', '--help']\n"
        "try: main()\n"
        "except SystemExit: pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "print('seconds', time.perf_counter() - t, file=sys.stderr)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Exit codes" in result.stdout and "train" in result.stdout
    # Generous bound for a loaded CI machine; it answers in ~0.1 s here.
    assert time.perf_counter() - started < 5


def test_train_help_documents_every_option_with_env_var_and_exit_codes():
    result = run_job("train", "--help")
    assert result.returncode == 0
    for option in ("--epochs", "--batch-size", "--learning-rate", "--hidden-units", "--seed",
                   "--output-dir", "--data-dir", "--max-train-samples", "--num-images",
                   "--overwrite", "--verbose", "--strategy", "--device", "--checkpoint-every",
                   "--deterministic"):  # fmt: skip
        assert option in result.stdout, option
    assert "MNIST_JOB_EPOCHS" in result.stdout
    assert "143" in result.stdout


def test_every_option_of_every_command_has_its_env_var():
    # The containers and manifests configure the job through MNIST_JOB_*, first
    # (MLflow's own variables may follow it).
    import click

    from job.cli import cli

    def commands(group):
        for command in group.commands.values():
            yield from commands(command) if isinstance(command, click.Group) else [command]

    missing = [
        f"{command.name} {param.opts[0]}"
        for command in commands(cli)
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and param.name != "help"
        and ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [None])[0]
        != "MNIST_JOB_" + param.opts[0].lstrip("-").upper().replace("-", "_")
    ]  # fmt: skip
    assert not missing


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--epochs", "0"], {}, "--epochs"),
        (["--batch-size", "x"], {}, "--batch-size"),
        (["--batch-size", "-1"], {}, "--batch-size"),
        (["--hidden-units", "abc"], {}, "--hidden-units"),
        (["--hidden-units", "128,0"], {}, "--hidden-units"),
        (["--learning-rate", "-1"], {}, "--learning-rate"),
        (["--num-images", "101"], {}, "--num-images"),
        (["--learning-rate", "inf"], {}, "--learning-rate"),
        (["--seed", "-1"], {}, "--seed"),
        (["--worker-port", "70000"], {}, "--worker-port"),
        (["--strategy", "bogus"], {}, "multi-worker"),  # the error lists valid names
        (["--no-such-option"], {}, "--no-such-option"),
        ([], {"MNIST_JOB_EPOCHS": "0"}, "epochs"),
        (["--hidden-units", "99999999999999999999999"], {}, "--hidden-units"),  # past int64
        (["--hidden-units", "100000000000,100000000000"], {}, "--hidden-units"),  # 1e22 weights
        (["--output-dir", ""], {}, "--output-dir"),  # would be the working directory
    ],
)
def test_bad_input_is_one_line_exit_2(args, env, names):
    result = run_job("train", *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert names in lines[0]


@pytest.mark.slow  # TensorFlow's allocator retries for 10 s before it gives up
def test_a_model_too_big_for_memory_is_one_line_exit_1(tmp_path):
    # 784 x 1e14 float32 weights: ~300 PB, beyond any address space, so no
    # allocation can succeed even where the kernel overcommits memory.
    units = "100000000000000"
    result = run_tiny_job("train", "--hidden-units", units, "--output-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert f"out of memory (OOM when allocating tensor with shape[784,{units}])" in errors[0]
    assert "--hidden-units" in errors[0]


def test_a_diverging_learning_rate_is_one_line_exit_2(tmp_path):
    result = run_tiny_job("train", "--learning-rate", "1e30", "--output-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "training diverged" in errors[0]
    assert "loss nan" not in result.stderr  # no epoch line with a NaN loss was logged


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    import click

    from job import cli

    def interrupted(*args, **kwargs):
        raise click.exceptions.Abort()  # what click makes of a KeyboardInterrupt

    monkeypatch.setattr(cli.cli, "main", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "mnist-job: interrupted; rerun train to resume from its checkpoint"
    ]


def test_data_commands_look_for_mnist_where_train_does(tmp_path, monkeypatch):
    # SageMaker mounts the training channel at SM_CHANNEL_TRAINING; `data verify`
    # must check that directory, not the default cache.
    monkeypatch.delenv("MNIST_JOB_DATA_DIR", raising=False)  # it would win
    channel = tmp_path / "channel"
    channel.mkdir()
    result = run_job("data", "verify", env={"SM_CHANNEL_TRAINING": str(channel)})
    assert result.returncode == 3, result.stderr
    assert f"no MNIST file at {channel / 'mnist.npz'}" in result.stderr


def test_platform_env_redirects_the_artifacts_end_to_end(tmp_path):
    """Vertex AI's variables move the model, checkpoints and logs; metrics stay in
    the output dir. A `--model_dir` URI (SageMaker) is accepted and logged."""
    env = {
        "AIP_MODEL_DIR": str(tmp_path / "model"),
        "AIP_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "logs"),
    }
    result = run_tiny_job(
        "train", "--epochs", "1", "--output-dir", str(tmp_path / "out"),
        "--model_dir", "s3://bucket/model", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "s3://bucket/model" in result.stderr
    assert (tmp_path / "model" / "model.keras").is_file()
    assert (tmp_path / "model" / "saved_model.pb").is_file()  # Vertex AI's import layout
    assert (tmp_path / "checkpoints" / "latest.npz").is_file()
    assert list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert not (tmp_path / "out" / "model.keras").exists()
