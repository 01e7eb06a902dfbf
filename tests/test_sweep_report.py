"""`sweep report`: every trial ranked by the spec's metric, unfinished ones
with where they stand; and TensorBoard on a sweep dir comparing the trials
in its HParams dashboard."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.error

import numpy as np
import pytest
from PIL import Image

from job import checkpoint, sweep, sweep_report
from job.checkpoint import TrainState
from scripts.multiworker import free_ports
from tests.conftest import run_tiny_job
from tests.test_tensorboard import TENSORBOARD, Client


def record(epoch: int, val_accuracy: float) -> dict:
    return {"epoch": epoch, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.4,
            "val_accuracy": val_accuracy, "seconds": 1.5, "images_per_second": 100.0}  # fmt: skip


def finish(out, index: int, loss: float, accuracy: float, epochs: int = 3) -> None:
    """What a finished trial leaves: its metrics.json (the parts the report reads)."""
    history = [record(e, accuracy - 0.1 * (epochs - e)) for e in range(1, epochs + 1)]
    metrics = {"test": {"loss": loss, "accuracy": accuracy}, "history": history}
    sweep.write_json(out / f"trial-{index}" / "metrics.json", metrics)


def test_ranks_by_the_metric_and_shows_where_unfinished_trials_stand(tmp_path):
    spec = {
        "metric": "test_loss",
        "fixed": {"epochs": 3},
        "grid": {"learning-rate": [0.1, 0.01, 0.001], "hidden-units": ["64", "16"]},
    }
    found = sweep.parse(spec)
    sweep.record(found, tmp_path)
    finish(tmp_path, 0, loss=0.30, accuracy=0.90)
    finish(tmp_path, 3, loss=0.10, accuracy=0.95)
    finish(tmp_path, 4, loss=0.20, accuracy=0.97)
    sweep.write_json(tmp_path / "trial-1" / "failed.json", {"exit_code": 2, "error": "diverged"})
    state = TrainState(epoch=1, step=3, steps_per_epoch=10, history=[record(1, 0.5)])
    weights = [np.zeros((2, 2), np.float32)]
    checkpoint.save(tmp_path / "trial-2" / "checkpoints" / "latest.npz", weights, weights, state)

    table = sweep_report.write(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["metric"], report["goal"]) == ("test_loss", "minimize")
    rows = [(t["rank"], t["trial"], t["status"]) for t in report["trials"]]
    assert rows == [
        (1, 3, "finished"),  # the lowest loss first, whatever its accuracy
        (2, 4, "finished"),
        (3, 0, "finished"),
        (None, 1, "failed (exit 2): diverged"),
        (None, 2, "epoch 1/3 checkpointed (+3 steps)"),
        (None, 5, "not started"),
    ]
    assert report["trials"][0]["settings"] == {"epochs": 3, "learning-rate": 0.01,
                                               "hidden-units": "16"}  # fmt: skip
    assert report["trials"][0]["train_seconds"] == pytest.approx(4.5)
    lines = table.splitlines()
    assert lines[0] == (
        "| rank | trial | learning-rate | hidden-units | test_loss | test_accuracy | train s "
        "| status |"
    )
    assert lines[2] == "| 1 | 3 | 0.01 | 16 | 0.1000 | 0.9500 | 4.5 | finished |"
    assert lines[-1] == "| - | 5 | 0.001 | 16 | - | - | - | not started |"
    markdown = (tmp_path / "report.md").read_text()
    assert table in markdown and "3 of 6 trials finished" in markdown
    assert "![report](report.png)" in markdown
    with Image.open(io.BytesIO((tmp_path / "report.png").read_bytes())) as image:
        assert image.size == (1200, 450)


def test_a_dir_without_a_sweep_is_one_line_and_exit_2(tmp_path):
    result = run_tiny_job("sweep", "report", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mnist-job: error: {tmp_path} holds no sweep.json: not a sweep dir"
    )


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    spec = out.parent / "spec.json"
    spec.write_text(json.dumps({"fixed": {"epochs": 2, "num-images": 0},
                                "grid": {"learning-rate": [0.01, 0.001]}}))  # fmt: skip
    result = run_tiny_job("sweep", "run", str(spec), "--output-dir", str(out), "--parallel", "2")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_tensorboard_compares_the_trials_in_its_hparams_dashboard(finished_sweep):
    """`mnist-job tensorboard --logdir SWEEP_DIR`: each trial a session group,
    its learning rate next to its test accuracy."""
    out = finished_sweep
    (port,) = free_ports(1)
    log = out.parent / "tensorboard.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            [str(TENSORBOARD), "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port),
             "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:
        runs = {"trial-0/tensorboard", "trial-1/tensorboard/validation"}
        deadline = time.monotonic() + 90
        while True:
            try:
                if set(client.get("/data/runs")) >= runs:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        groups = client.post(
            "/data/plugin/hparams/session_groups",
            {"experimentName": "", "startIndex": 0, "sliceSize": 10,
             "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
             "colParams": [{"hparam": "learning_rate"}, {"metric": {"tag": "test_accuracy"}}]},
        )["sessionGroups"]  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)
    found = {}
    for group in groups:
        (session,) = group["sessions"]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]
                  if not m["name"]["group"]}  # fmt: skip
        found[session["name"]] = (group["hparams"]["learning_rate"], values["test_accuracy"])
    assert set(found) == {"trial-0/tensorboard", "trial-1/tensorboard"}
    for index, rate in ((0, 0.01), (1, 0.001)):
        metrics = json.loads((out / f"trial-{index}" / "metrics.json").read_text())
        learning_rate, accuracy = found[f"trial-{index}/tensorboard"]
        assert learning_rate == pytest.approx(rate)
        assert accuracy == pytest.approx(metrics["test"]["accuracy"], rel=1e-6)
