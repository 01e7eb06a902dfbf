"""MLflow tracking, against real MLflow: a SQLite store read back through
MlflowClient, and `mlflow server` on 127.0.0.1 reached through its REST API."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest

from job import checkpoint
from job.config import TrainConfig, from_options
from job.errors import ConfigError, Terminated
from job.options import train_options
from job.runner import run
from job.tracking import PARAMS, tracked
from tests.conftest import run_tiny_job
from tests.stores import FlakyProxy, free_port, serving

MODEL_NAME = "mnist-tiny"
FIGURES = ("predictions.png", "confusion_matrix.png", "misclassified.png")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1, with a SQLite store and
    artifacts served through it; its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    with serving(command, port, "mlflow server", {"MLFLOW_DISABLE_TELEMETRY": "true"}) as url:
        yield url


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_reset():
    """Tracking sets MLflow's tracking URI in its process: not beyond a test
    (conftest restores the variables it sets)."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # as the test found it


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def only_run(uri: str, experiment: str = "mnist-job"):
    """The one run of `experiment` at `uri`."""
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def epoch_series(uri: str, run_id: str, metric: str = "loss") -> list[tuple[int, float]]:
    history = client_for(uri).get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in history)


def assert_recorded(uri: str, out: Path, epochs: int):
    """The run at `uri` holds what the run wrote to `out`; returns it."""
    recorded = only_run(uri)
    metrics = json.loads((out / "metrics.json").read_text())
    assert recorded.info.status == "FINISHED"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        series = epoch_series(uri, recorded.info.run_id, name)
        assert [step for step, _ in series] == list(range(1, epochs + 1))
        assert [value for _, value in series] == pytest.approx(
            [r[name] for r in metrics["history"]]
        )
    assert recorded.data.metrics["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert recorded.data.metrics["train_images_per_second"] > 0
    artifacts = {a.path for a in client_for(uri).list_artifacts(recorded.info.run_id)}
    assert {*FIGURES, "metrics.json"} <= artifacts
    return recorded


def assert_registered_model_predicts(uri: str, out: Path, tiny, version: str = "1"):
    """The registered model loads with mlflow.pyfunc and predicts what model.keras does."""
    import keras
    import mlflow

    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{MODEL_NAME}/{version}"
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28)
    assert info.saved_input_example_info is not None
    images = (tiny.x_test[:20] / 255).astype(np.float32)
    predicted = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images))
    expected = keras.saving.load_model(out / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    assert (predicted.argmax(axis=1) == tiny.y_test[:20]).mean() >= 0.9


@pytest.mark.slow
def test_a_sqlite_store_holds_params_epochs_artifacts_and_the_model(
    tmp_path, tiny, tiny_config, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root would be ./mlruns
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    config = tiny_config.replace(mlflow_tracking_uri=uri, mlflow_model_name=MODEL_NAME)
    run(config, datasets=tiny)

    recorded = assert_recorded(uri, config.output_dir, epochs=2)
    params = recorded.data.params
    assert params["hidden_units"] == "128,64"
    assert params["learning_rate"] == "0.001"
    assert params["max_train_samples"] == "None"
    assert params["train_images"] == "320"
    assert set(PARAMS) <= set(params)
    tags = recorded.data.tags
    assert tags["strategy"] == "default" and tags["device"] == "CPU"
    assert (
        tags["version.tensorflow"]
        == json.loads((config.output_dir / "metrics.json").read_text())["versions"]["tensorflow"]
    )
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from a checkout
    # Artifacts beside the database, nothing in the working directory.
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert_registered_model_predicts(uri, config.output_dir, tiny)


def test_every_setting_in_the_checkpoint_fingerprint_is_a_param(tiny_config):
    """What makes a checkpoint unusable for a run changes the result."""
    fingerprint = checkpoint.fingerprint(tiny_config, train_size=320)
    assert set(fingerprint) - {"train_size"} <= set(PARAMS)


@pytest.mark.slow
def test_a_preempted_run_resumes_the_same_mlflow_run(tmp_path, tiny, tiny_config, monkeypatch):
    """SIGTERM in epoch 2: the MLflow run is KILLED with epoch 1; the rerun
    continues it to the end, one series of epochs 1-2, FINISHED."""
    from job.loop import Trainer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config.replace(mlflow_tracking_uri=uri, checkpoint_every=4)
    real_run_chunk = Trainer.run_chunk
    calls = []

    def sigterm_in_epoch_2(self, data, order, start, stop, stop_requested):
        calls.append(start)
        result = real_run_chunk(self, data, order, start, stop, stop_requested)
        if len(calls) == 4:  # steps 0-4 of epoch 2 (chunks of 4 of 10 steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "run_chunk", sigterm_in_epoch_2)
    with pytest.raises(Terminated):
        run(config, datasets=tiny)
    stopped = only_run(uri)
    assert stopped.info.status == "KILLED"
    assert [step for step, _ in epoch_series(uri, stopped.info.run_id)] == [1]
    _, _, state = checkpoint.load(config.checkpoint_path)
    assert state.mlflow_run_id == stopped.info.run_id

    monkeypatch.setattr(Trainer, "run_chunk", real_run_chunk)
    run(config, datasets=tiny)
    resumed = assert_recorded(uri, config.output_dir, epochs=2)
    assert resumed.info.run_id == stopped.info.run_id


@pytest.mark.parametrize("first", ["untracked", "another store"])
def test_a_resumed_run_new_to_the_store_gets_every_epoch(
    tmp_path, tiny, tiny_config, first, caplog
):
    """Tracking turned on for the rerun, its server down before, or another
    store now: the epochs trained before are logged from the checkpoint."""
    from tests.conftest import cut_short_after_one_epoch

    other = f"sqlite:///{tmp_path}/other.db" if first == "another store" else None
    cut_short_after_one_epoch(tiny_config.replace(mlflow_tracking_uri=other), tiny)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run(tiny_config.replace(mlflow_tracking_uri=uri), datasets=tiny)
    assert_recorded(uri, tiny_config.output_dir, epochs=2)
    starting_anew = [r for r in caplog.records if "starting a new one" in r.getMessage()]
    assert len(starting_anew) == (first == "another store")


@pytest.mark.slow
def test_a_tracking_server_records_the_cli_run_through_its_rest_api(tmp_path, tiny, mlflow_server):
    out = tmp_path / "out"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MNIST_JOB_MLFLOW_EXPERIMENT": "rest"}
    done = run_tiny_job(
        "train", "--output-dir", str(out), "--epochs", "3", "--mlflow-model-name", "rest-model",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = client_for(mlflow_server)
    recorded = only_run(mlflow_server, "rest")
    assert recorded.info.status == "FINISHED"
    assert [step for step, _ in epoch_series(mlflow_server, recorded.info.run_id)] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(recorded.info.run_id)}
    assert {*FIGURES, "metrics.json"} <= artifacts
    assert client.get_model_version("rest-model", "1").run_id == recorded.info.run_id
    link = f"{mlflow_server}/#/experiments/{recorded.info.experiment_id}/runs/"
    assert link + recorded.info.run_id in done.stderr
    assert "registered model rest-model version 1" in done.stderr


class Refusing(BaseHTTPRequestHandler):
    """A tracking server that answers every request 403."""

    def do_GET(self):
        body = json.dumps({"error_code": "PERMISSION_DENIED", "message": "go away"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(params=["unreachable", "refusing"])
def broken_server(request):
    if request.param == "unreachable":
        yield f"http://127.0.0.1:{free_port()}", "Connection refused"
        return
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", "PERMISSION_DENIED: go away"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_tracking_server_that_fails_is_one_warning_and_the_run_succeeds(tmp_path, broken_server):
    url, reason = broken_server
    out = tmp_path / "out"
    done = run_tiny_job(
        "train", "--output-dir", str(out), "--epochs", "2", env={"MLFLOW_TRACKING_URI": url}
    )
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.json").exists()
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert f"MLflow at {url} failed; the run goes on untracked: " in warnings[0]
    assert f"MLflow at {url}, not logged: everything (" in warnings[1]
    assert reason in warnings[0] and reason in warnings[1]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_server_lost_mid_run_stops_tracking_and_names_what_was_not_logged(
    tmp_path, tiny, tiny_config, mlflow_server, monkeypatch, caplog
):
    from job.loop import Trainer

    proxy = FlakyProxy(mlflow_server)
    real_run_chunk = Trainer.run_chunk
    chunks = []

    def cut_in_epoch_2(self, *args):
        chunks.append(args)
        if len(chunks) == 2:
            proxy.cut()
        return real_run_chunk(self, *args)

    monkeypatch.setattr(Trainer, "run_chunk", cut_in_epoch_2)
    config = tiny_config.replace(mlflow_tracking_uri=proxy.url, mlflow_experiment="lost")
    try:
        run(config, datasets=tiny)
    finally:
        proxy.close()
    failures = [r for r in caplog.records if "goes on untracked" in r.getMessage()]
    assert len(failures) == 1
    summary = [r for r in caplog.records if r.name == "job.tracking"][-1].getMessage()
    assert summary.startswith(f"MLflow at {proxy.url}, not logged: the metrics of epoch 2, ")
    assert summary.count("metrics.json") == 1 and "the model" in summary
    recorded = only_run(mlflow_server, "lost")
    assert [step for step, _ in epoch_series(mlflow_server, recorded.info.run_id)] == [1]


@pytest.mark.parametrize("tracked_run", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mlflow_is_imported_only_when_a_run_is_tracked(tmp_path, tracked_run):
    env = {"MLFLOW_TRACKING_URI": "", "MNIST_JOB_MLFLOW_TRACKING_URI": ""}  # empty: unset
    if tracked_run:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # every import, on stderr
    done = run_tiny_job("train", "--output-dir", str(tmp_path / "out"), "--epochs", "1", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = re.search(r"^import time:.*\|\s*mlflow$", done.stderr, re.MULTILINE)
    assert bool(imported) == tracked_run


def test_workers_other_than_the_chief_track_nothing(tiny_config):
    config = tiny_config.replace(mlflow_tracking_uri="http://127.0.0.1:9")
    state = checkpoint.TrainState(steps_per_epoch=10)
    with tracked(config, state, SimpleNamespace(is_chief=False)) as tracker:
        tracker.epoch_end({"epoch": 1})
    assert tracker.client is None and state.mlflow_run_id is None


@train_options
@click.command()
def train(**options):
    """A command with train's options, to read what click makes of them."""


def test_the_tracking_uri_comes_from_the_flag_then_mnist_job_then_mlflows_variable(
    monkeypatch,
):
    for name in [name for name in os.environ if "MLFLOW" in name]:
        monkeypatch.delenv(name)

    def tracking(*args):
        params = train.make_context("train", list(args)).params
        return params["mlflow_tracking_uri"], params["mlflow_experiment"]

    assert tracking() == (None, "mnist-job")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MNIST_JOB_MLFLOW_EXPERIMENT", "mine")
    assert tracking() == ("http://mlflow:5000", "mine")
    monkeypatch.setenv("MNIST_JOB_MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    assert tracking()[0] == "sqlite:///mine.db"
    assert tracking("--mlflow-tracking-uri", "http://flag")[0] == "http://flag"


def test_empty_mlflow_settings_are_refused():
    for field in ("mlflow_tracking_uri", "mlflow_experiment", "mlflow_model_name"):
        with pytest.raises(ConfigError, match="must not be empty"):
            TrainConfig(**{field: " "})
    assert from_options({"mlflow_tracking_uri": None}, {}).mlflow_tracking_uri is None


def test_the_log_shows_the_tracking_uri_without_its_password():
    from job.tracking import Tracker

    config = TrainConfig(mlflow_tracking_uri="https://me:s3cret@mlflow.example/")
    assert Tracker(config).uri == "https://mlflow.example/"
