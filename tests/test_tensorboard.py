"""TensorBoard as users meet it: a real server on a finished run, asked through
its HTTP API for the runs, scalars, images, graph and hparams a run must show."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from job.config import TrainConfig
from job.runner import run
from scripts.multiworker import free_ports

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
RUNS = ("tensorboard", "tensorboard/train", "tensorboard/validation")


class Client:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params):
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.base}{path}?{query}", timeout=30) as response:
            body = response.read()
        is_json = response.headers.get_content_type() == "application/json"
        return json.loads(body) if is_json else body

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            self.base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny):
    # 10 steps an epoch; chunks end at global steps 4, 8, 10 | 12, 16, 20.
    out = tmp_path_factory.mktemp("tb") / "run"
    config = TrainConfig(
        epochs=2, checkpoint_every=4, output_dir=out, num_images=3, compile_cache=None
    )
    return config, run(config.replace(strategy="default"), datasets=tiny)


@pytest.fixture(scope="module")
def tensorboard(finished):
    """`make tensorboard`'s command on the run's output dir, until it has read every run."""
    config, _ = finished
    (port,) = free_ports(1)
    command = [str(TENSORBOARD), "--logdir", str(config.output_dir), "--host", "127.0.0.1",
               "--port", str(port), "--reload_interval", "1"]  # fmt: skip
    log = config.output_dir.parent / "tensorboard.log"  # a file: a full pipe would block it
    with open(log, "wb") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if set(client.get("/data/runs")) >= set(RUNS):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tensorboard did not serve the run: {log.read_text()}")
            time.sleep(0.5)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def points(client: Client, run_name: str, tag: str) -> list[tuple[int, float]]:
    found = client.get("/data/plugin/scalars/scalars", run=run_name, tag=tag)
    return [(step, value) for _, step, value in found]


def test_scalars_per_epoch_per_chunk_and_learning_rate(tensorboard, finished):
    config, result = finished
    tags = tensorboard.get("/data/plugin/scalars/tags")
    assert set(tags["tensorboard/train"]) == {
        "epoch_loss", "epoch_accuracy", "batch_loss", "learning_rate",
    }  # fmt: skip
    assert set(tags["tensorboard/validation"]) == {"epoch_loss", "epoch_accuracy"}
    assert set(tags["tensorboard"]) == {"test_loss", "test_accuracy"}

    history = result.metrics["history"]
    for run_name, prefix in (("tensorboard/train", ""), ("tensorboard/validation", "val_")):
        for tag in ("loss", "accuracy"):
            found = points(tensorboard, run_name, f"epoch_{tag}")
            assert [step for step, _ in found] == [1, 2]
            expected = [record[prefix + tag] for record in history]
            assert [value for _, value in found] == pytest.approx(expected, rel=1e-6)
    assert [step for step, _ in points(tensorboard, "tensorboard/train", "batch_loss")] == [
        4, 8, 10, 12, 16, 20,
    ]  # fmt: skip
    assert points(tensorboard, "tensorboard/train", "learning_rate") == [
        (1, pytest.approx(config.learning_rate)),
        (2, pytest.approx(config.learning_rate)),
    ]
    (_, accuracy), = points(tensorboard, "tensorboard", "test_accuracy")  # fmt: skip
    assert accuracy == pytest.approx(result.metrics["test"]["accuracy"], rel=1e-6)


def test_images_predictions_confusion_matrix_and_mistakes(tensorboard):
    tags = tensorboard.get("/data/plugin/images/tags")["tensorboard/validation"]
    assert set(tags) == {"predictions", "confusion_matrix", "misclassified"}
    (entry,) = tensorboard.get(
        "/data/plugin/images/images", run="tensorboard/validation", tag="confusion_matrix"
    )
    assert entry["step"] == 2
    query = dict(urllib.parse.parse_qsl(entry["query"]))
    png = tensorboard.get("/data/plugin/images/individualImage", **query)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (700, 600)


def test_model_graph(tensorboard):
    info = tensorboard.get("/data/plugin/graphs/info")
    assert info["tensorboard/train"]["run_graph"] is True
    graph = tensorboard.get("/data/plugin/graphs/graph", run="tensorboard/train").decode()
    assert 'op: "Placeholder"' in graph and 'op: "MatMul"' in graph and "Softmax" in graph


def test_hparams_dashboard(tensorboard, finished):
    config, result = finished
    experiment = tensorboard.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert names >= {"learning_rate", "batch_size", "epochs", "hidden_units", "seed", "strategy"}
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert {("", "test_accuracy"), ("validation", "epoch_accuracy")} <= metrics

    groups = tensorboard.post(
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            "colParams": [{"hparam": "learning_rate"}, {"metric": {"tag": "test_accuracy"}}],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )["sessionGroups"]
    (group,) = groups
    assert group["hparams"]["learning_rate"] == pytest.approx(config.learning_rate)
    assert group["hparams"]["hidden_units"] == "128,64"
    assert group["hparams"]["strategy"] == "default"
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"] if not m["name"]["group"]}
    assert values["test_accuracy"] == pytest.approx(result.metrics["test"]["accuracy"], rel=1e-6)
