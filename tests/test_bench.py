"""`make bench` must not rot: CI runs a 1-epoch smoke of it (not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_bench_smoke_writes_results_and_chart(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| training loop |" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for variant in ("seed", "mnist_job"):
        median = results[variant]["median"]
        assert set(median) == {
            "fit_seconds", "wall_seconds", "peak_rss_mb", "peak_anonymous_mb",
            "images_per_second", "test_accuracy",
        }  # fmt: skip
        # The sampled anonymous part is real and, with TensorFlow's libraries
        # mapped beside it, below the peak RSS.
        assert 0 < median["peak_anonymous_mb"] < median["peak_rss_mb"]
        assert median["test_accuracy"] > 0.9  # one epoch of real MNIST
    assert set(results["ratios"]) == {
        "fit_seconds", "wall_seconds", "peak_rss_mb", "peak_anonymous_mb",
    }  # fmt: skip
    assert set(results["workers"]) == {"1", "2"}
    floor = {what: mb["peak_rss_mb"] for what, mb in results["memory_floor"].items()}
    # TensorFlow alone is most of the job's memory; the job holds more on top.
    assert 0 < floor["import tensorflow"] < floor["one compiled step"]
    assert floor["one compiled step"] < results["mnist_job"]["median"]["peak_rss_mb"]
    assert "peak RSS without the job's data or artifacts" in result.stdout
    with Image.open(tmp_path / "results.png") as chart:
        assert chart.format == "PNG"
