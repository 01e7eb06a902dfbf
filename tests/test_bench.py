"""`make bench` must not rot: CI runs a 1-epoch smoke of it (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_loop_breakdown_separates_the_one_time_compile_from_the_steps():
    bench = load_bench()
    metrics = {
        "train_images": 60000,
        "config": {"batch_size": 32},
        "timings": {"fit_seconds": 2.4},
        "history": [{"seconds": s} for s in (0.9, 0.3, 0.31, 0.29, 0.3)],
    }
    breakdown = bench.loop_breakdown(metrics)
    assert breakdown["compile_seconds"] == pytest.approx(0.6)
    assert breakdown["step_microseconds"] == pytest.approx(0.3 / 1875 * 1e6)
    assert breakdown["between_epochs_seconds"] == pytest.approx(2.4 - 2.1)
    # One epoch has no steady epoch to compare with.
    assert bench.loop_breakdown({**metrics, "history": metrics["history"][:1]}) == {}
    line = bench.loop_line(breakdown, step_gflop=0.0145, peak=200.0)
    assert "0.60 s tracing the step and compiling it" in line
    assert "160 µs a step (91 GFLOP/s" in line and "45% of" in line


def test_step_gflop_counts_the_mlps_matrix_products():
    # 784-128-64-10 at batch 32: forward and weight gradients 2*32*109,184 FLOP
    # each, input gradients of the last two layers 2*32*8,832.
    assert load_bench().step_gflop(32, (128, 64)) == pytest.approx(0.0145408)


@pytest.mark.slow
@pytest.mark.network
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
    assert "| mnist-job, first run |" in result.stdout  # the table's header
    results = json.loads((tmp_path / "results.json").read_text())
    for variant in ("seed", "mnist_job", "mnist_job_cold"):
        median = results[variant]["median"]
        assert set(median) == {
            "fit_seconds", "wall_seconds", "peak_rss_mb", "peak_anonymous_mb",
            "images_per_second", "test_accuracy",
        }  # fmt: skip
        # The sampled anonymous part is real and, with TensorFlow's libraries
        # mapped beside it, below the peak RSS.
        assert 0 < median["peak_anonymous_mb"] < median["peak_rss_mb"]
        assert median["test_accuracy"] > 0.9  # one epoch of real MNIST
    for ratios in (results["ratios"], results["mnist_job_cold"]["ratios"]):
        assert set(ratios) == {
            "fit_seconds", "wall_seconds", "peak_rss_mb", "peak_anonymous_mb",
        }  # fmt: skip
    assert set(results["workers"]) == {"1", "2"}
    assert results["machine"]["matmul_gflops"] > 0
    floor = {what: mb["peak_rss_mb"] for what, mb in results["memory_floor"].items()}
    # TensorFlow alone is most of the job's memory; the job holds more on top.
    assert 0 < floor["import tensorflow"] < floor["one step from the compile cache"]
    assert floor["one step from the compile cache"] < floor["one compiled step"]
    assert floor["one compiled step"] < results["mnist_job_cold"]["median"]["peak_rss_mb"]
    assert floor["one step from the compile cache"] < results["mnist_job"]["median"]["peak_rss_mb"]
    assert "peak RSS without the job's data or artifacts" in result.stdout
    with Image.open(tmp_path / "results.png") as chart:
        assert chart.format == "PNG"
