from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.config import TrainConfig
from tests.tiny import tiny_mnist

ROOT = Path(__file__).resolve().parent.parent

# The object-store fixtures (`stores`, `store`): local S3 and GCS servers.
pytest_plugins = ["tests.stores"]

# The job as users get it: the compile cache off unless a test asks for one,
# never the cache of whoever runs the tests.
os.environ.pop("MNIST_JOB_COMPILE_CACHE", None)


@pytest.fixture(autouse=True)
def environment_restored():
    """The CLI run in-process sets TensorFlow's variables (TF_CPP_MIN_LOG_LEVEL,
    XLA_FLAGS...) in os.environ: not beyond a test, where the job that a later
    test starts would inherit them (another compile-cache key, a log level)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny():
    return tiny_mnist()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny):
    """(config, RunResult) of one finished 2-epoch run on the tiny data, shared
    by the tests that only read its outputs."""
    from job.runner import run

    out = tmp_path_factory.mktemp("run") / "out"
    config = TrainConfig(
        epochs=2, output_dir=out, num_images=3, strategy="default", compile_cache=None
    )
    return config, run(config, datasets=tiny)


@pytest.fixture
def tiny_config(tmp_path) -> TrainConfig:
    """A config that trains in about a second on the tiny data."""
    return TrainConfig(
        epochs=2,
        batch_size=32,
        output_dir=tmp_path / "out",
        data_dir=tmp_path / "no-data-needed",
        num_images=3,
        strategy="default",
        compile_cache=None,
    )


def cut_short_after_one_epoch(config: TrainConfig, tiny):
    """Run one epoch of `config`, then pretend the run was cut short there:
    its checkpoint stays, its metrics.json (the "finished" mark) goes."""
    from job.runner import run

    first = run(config.replace(epochs=1), datasets=tiny)
    (config.output_dir / "metrics.json").unlink()
    return first


def run_job(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `python -m job ARGS` from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    """The one-line errors the CLI printed, without TensorFlow's own chatter."""
    return [line for line in stderr.splitlines() if line.startswith("mnist-job: error:")]


def run_tiny_job(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI on tiny data in a subprocess (see tests/tiny_job.py)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tiny_job.py"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def start_tiny_job(*args: str, env: dict | None = None) -> subprocess.Popen:
    """run_tiny_job, started in the background (text stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tiny_job.py"), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (REQUIRE_DOCKER=1) a docker test that skips is a failure: CI must run it."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("REQUIRE_DOCKER") == "1" and "docker" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"docker test skipped in CI, where it must run: {report.longrepr}"
