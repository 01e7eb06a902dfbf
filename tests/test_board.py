"""`mnist-job tensorboard` as users meet it: a real TensorBoard, asked over its
HTTP API, on logs in a real local S3 server and GCS emulator (tests/stores.py)
while more of them arrive, and on a local dir as plain `tensorboard` would."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from job import storage
from job.config import TrainConfig
from job.errors import ExitCode
from job.model import build_model
from job.runner import run
from job.summaries import Summaries
from tests.conftest import ROOT, error_lines, run_job
from tests.stores import free_port
from tests.test_tensorboard import Client, points

RUNS = {".", "train", "validation"}  # the runs of a --tensorboard-dir, served as the logdir


def epoch_record(epoch: int) -> dict:
    loss = 1.0 / epoch
    return {"epoch": epoch, "loss": loss, "accuracy": 1 - loss / 2, "val_loss": loss + 0.1,
            "val_accuracy": 1 - loss / 3}  # fmt: skip


def png(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, (255, 0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def first_epoch(log_dir: Path) -> Summaries:
    """What a run has written after its first epoch: the graph, an epoch's
    scalars, a figure and the hparams, as job.runner writes them."""
    summaries = Summaries(log_dir)
    summaries.graph(build_model((8,)))
    summaries.epoch(epoch_record(1), learning_rate=0.001)
    summaries.image("confusion_matrix", png(), step=1)
    summaries.hparams({"learning_rate": 0.001, "batch_size": 32}, {"accuracy": 0.5}, step=1)
    return summaries


def wait_for(condition, what: str, server: subprocess.Popen, log: Path, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, KeyError):
            if condition():
                return
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"TensorBoard never showed {what}:\n{log.read_text()}")
        time.sleep(0.25)


@contextlib.contextmanager
def board(logdir: str, tmp_path: Path, env: dict | None = None) -> Iterator[tuple]:
    """`mnist-job tensorboard` on `logdir`, reloading every second; yields
    (client, server, log) once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "job", "tensorboard", "--logdir", logdir, "--host",
               "127.0.0.1", "--port", str(port), "--", "--reload_interval", "1"]  # fmt: skip
    log = tmp_path / "tensorboard.log"  # a file: a full pipe would block it
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: client.get("/data/runs") is not None, "its runs", server, log)
        yield client, server, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_serves_a_bucket_live_while_the_run_writes(store, tmp_path):
    uri = store.uri("run") + "/tensorboard"
    with board(uri, tmp_path, store.env) as (client, server, log):
        assert client.get("/data/runs") == []  # started before the run wrote anything
        local = tmp_path / "tensorboard"
        summaries = first_epoch(local)
        storage.upload_tree(local, uri)  # as job.mirror does each epoch
        wait_for(lambda: set(client.get("/data/runs")) >= RUNS, "the runs", server, log)
        wait_for(lambda: points(client, "train", "epoch_loss"), "epoch 1", server, log)
        assert points(client, "train", "epoch_loss") == [(1, pytest.approx(1.0))]

        # Scalars, Images, Graphs and HParams all read through the TensorFlow-free layer.
        tags = client.get("/data/plugin/scalars/tags")
        assert {"epoch_loss", "epoch_accuracy", "learning_rate"} <= set(tags["train"])
        assert set(tags["."]) == {"test_accuracy"}
        (image,) = client.get(
            "/data/plugin/images/images", run="validation", tag="confusion_matrix"
        )
        query = dict(urllib.parse.parse_qsl(image["query"]))
        figure = client.get("/data/plugin/images/individualImage", **query)
        with Image.open(io.BytesIO(figure)) as opened:
            assert opened.size == (40, 30)
        graph = client.get("/data/plugin/graphs/graph", run="train").decode()
        assert 'op: "MatMul"' in graph and "Softmax" in graph
        experiment = client.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {i["name"] for i in experiment["hparamInfos"]} == {"learning_rate", "batch_size"}

        # The next epoch grows the same event files; the run uploads them again.
        summaries.epoch(epoch_record(2), learning_rate=0.001)
        summaries.close()
        assert len(list((local / "train").glob("events.out.tfevents.*"))) == 1
        storage.upload_tree(local, uri)  # as job.mirror does each epoch
        wait_for(
            lambda: len(points(client, "validation", "epoch_loss")) == 2, "epoch 2", server, log
        )
        assert points(client, "train", "epoch_loss") == [
            (1, pytest.approx(1.0)), (2, pytest.approx(0.5))
        ]  # fmt: skip
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_serves_what_a_run_to_a_bucket_wrote(store, tiny, tmp_path):
    uri = store.uri("run")
    config = TrainConfig(epochs=2, output_dir=uri, num_images=3, strategy="default",
                         staging_dir=tmp_path / "staging", compile_cache=None)  # fmt: skip
    history = run(config, datasets=tiny).metrics["history"]
    with board(f"{uri}/tensorboard", tmp_path, store.env) as (client, server, log):
        wait_for(lambda: set(client.get("/data/runs")) >= RUNS, "the runs", server, log)
        for run_name, prefix in (("train", ""), ("validation", "val_")):
            found = points(client, run_name, "epoch_accuracy")
            expected = [(r["epoch"], pytest.approx(r[prefix + "accuracy"])) for r in history]
            assert found == expected


@pytest.mark.slow
def test_a_local_dir_is_served_as_plain_tensorboard_serves_it(tmp_path):
    first_epoch(tmp_path / "tensorboard").close()
    with board(str(tmp_path / "tensorboard"), tmp_path) as (client, server, log):
        wait_for(lambda: points(client, "train", "epoch_loss"), "epoch 1", server, log)
        assert points(client, "train", "epoch_loss") == [(1, pytest.approx(1.0))]
    assert "TensorFlow installation not found" not in log.read_text()  # TensorFlow's gfile


@pytest.mark.parametrize(
    ("logdir", "message"),
    [
        ("hdfs://namenode/logs", "hdfs://namenode/logs: only local paths, gs:// and s3://"),
        ("s3:///logs", "s3:///logs: no bucket name"),
    ],
    ids=["hdfs", "no-bucket-name"],
)
def test_a_scheme_it_cannot_read_is_one_line_and_exit_2(logdir, message):
    done = run_job("tensorboard", "--logdir", logdir)
    assert done.returncode == ExitCode.USAGE
    (line,) = error_lines(done.stderr)
    assert message in line
    assert done.stderr.strip() == line


@pytest.mark.slow
def test_a_missing_bucket_is_one_line_and_exit_2(store):
    logdir = f"{store.scheme}://no-such-bucket-{store.scheme}/run/tensorboard"
    done = run_job("tensorboard", "--logdir", logdir, env=store.env)
    assert done.returncode == ExitCode.USAGE
    assert done.stderr.strip() == f"mnist-job: error: {logdir}: no such bucket, or no access to it"
