"""`make bench` must not rot: CI runs a 1-epoch smoke of it (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script("bench")


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


def medians(fit, wall, rss, accuracy=0.977):
    return {
        "fit_seconds": fit, "wall_seconds": wall, "peak_rss_mb": rss,
        "peak_anonymous_mb": rss / 2, "images_per_second": 300000 / fit,
        "test_accuracy": accuracy,
    }  # fmt: skip


SEED = medians(fit=18.0, wall=22.0, rss=1500.0, accuracy=0.9755)


def test_targets_hold_or_miss_by_their_bounds():
    bench = load_bench()
    # Exactly on each bound holds: 8x, 4x, 0.5x, 0.97.
    checks = bench.check_targets(SEED, medians(fit=2.25, wall=5.5, rss=750.0, accuracy=0.97))
    assert [c["holds"] for c in checks] == [True] * 4
    assert [c["metric"] for c in checks] == [
        "fit_seconds", "wall_seconds", "peak_rss_mb", "test_accuracy",
    ]  # fmt: skip
    # Just beyond each bound misses, and the check says by how much.
    checks = bench.check_targets(SEED, medians(fit=2.4, wall=5.6, rss=859.0, accuracy=0.969))
    assert [c["holds"] for c in checks] == [False] * 4
    loop, wall, rss, accuracy = checks
    assert wall["value"] == pytest.approx(22 / 5.6)
    assert loop["value"] == pytest.approx(7.5)
    assert rss["value"] == pytest.approx(859 / 1500)
    assert accuracy["value"] == 0.969


def test_target_lines_say_pass_or_miss_with_the_numbers():
    bench = load_bench()
    loop, _, rss, accuracy = bench.check_targets(SEED, medians(fit=2.4, wall=5.0, rss=700.0))
    assert bench.target_line(loop) == (
        "MISS training loop: 7.50x faster than the seed (target >= 8x; "
        "seed 18.00 s, mnist-job first run 2.40 s)"
    )
    assert bench.target_line(rss) == (
        "PASS peak RSS: 0.47x the seed's (target <= 0.5x; seed 1500 MB, mnist-job first run 700 MB)"
    )
    assert bench.target_line(accuracy).startswith("PASS test accuracy: 0.9770 (target >= 0.97;")


def test_table_leads_with_the_first_run_and_keeps_the_warm_cache_beside_it():
    bench = load_bench()
    results = {
        "seed": {"median": SEED},
        "mnist_job_cold": {"median": medians(fit=2.4, wall=5.0, rss=860.0)},
        "mnist_job": {"median": medians(fit=2.0, wall=4.8, rss=780.0)},
    }
    lines = bench.table(results).splitlines()
    assert lines[0] == (
        "| | seed | mnist-job, first run | first run is "
        "| mnist-job, compile cache warm | warm cache is |"
    )
    assert lines[1].count("|") == lines[0].count("|")  # a valid markdown table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert rows["training loop"] == (
        "| training loop | 18.00 s | 2.40 s | 7.50x faster | 2.00 s | 9.00x faster |"
    )
    assert "| 860 MB | 0.57x the seed's | 780 MB | 0.52x the seed's |" in rows["peak RSS"]
    assert rows["test accuracy"].endswith("| 0.9770 | +0.0015 | 0.9770 | +0.0015 |")


@pytest.mark.parametrize("needs", [256, 288, 416, 448, 1000, 1024])
def test_memory_limit_bisects_to_the_smallest_completing_step(needs):
    memory_limit = load_script("memory_limit")
    tried = []

    def completes(limit):
        tried.append(limit)
        return limit >= needs

    completed, failed = memory_limit.smallest_limit(completes, 256, 1024, step=32)
    smallest = -(-needs // 32) * 32  # the first multiple of 32 at or above it
    if smallest == 256:
        assert (completed, failed) == (256, None)  # the lower end already completes
    else:
        assert (completed, failed) == (smallest, smallest - 32)
    assert all(limit % 32 == 0 for limit in tried)
    assert len(tried) <= 2 + 5  # both ends, then log2(768 / 32) rounded up
    assert tried[:2] == [1024, 256][: len(tried[:2])]


def test_memory_limit_says_when_even_the_upper_end_fails():
    memory_limit = load_script("memory_limit")
    assert memory_limit.smallest_limit(lambda limit: False, 256, 1024) == (None, 1024)
    with pytest.raises(ValueError, match="multiples of 32"):
        memory_limit.smallest_limit(lambda limit: True, 250, 1024)


def test_memory_limit_runs_with_swap_off_under_the_limit(tmp_path):
    """--memory-swap equal to --memory: no swap, as a kubelet runs a pod."""
    memory_limit = load_script("memory_limit")
    npz = tmp_path / "mnist.npz"
    job = memory_limit.docker_run("job", 448, "mnist-job:cpu", "n", None)
    assert " --memory 448m --memory-swap 448m " in " ".join(job)
    assert job[-2:] == ["mnist-job:cpu", "train"]  # the image's entrypoint, seed defaults
    seed = " ".join(memory_limit.docker_run("seed", 1280, "mnist-job:cpu", "n", npz))
    assert " --memory 1280m --memory-swap 1280m " in seed
    assert f"{ROOT / 'scripts'}:/seed:ro" in seed and f"{npz}:/data/mnist.npz:ro" in seed
    assert seed.endswith("--entrypoint python3 mnist-job:cpu /seed/seed_baseline.py "
                         "/data/mnist.npz /tmp/seed.png 5")  # fmt: skip


def test_memory_limit_table():
    memory_limit = load_script("memory_limit")
    job_runs = [
        {"limit_mib": 1024, "exit_code": 0, "seconds": 12.0},
        {"limit_mib": 416, "exit_code": 137, "seconds": 6.3},
        {"limit_mib": 448, "exit_code": 0, "seconds": 12.5},
    ]
    seed_runs = [{"limit_mib": 2048, "exit_code": None, "timed_out": True, "seconds": 600.0}]
    results = {
        "step_mib": 32,
        "targets": {
            "job": {
                "bounds_mib": [256, 1024], "completed_mib": 448, "failed_mib": 416,
                "runs": job_runs,
            },
            "seed": {
                "bounds_mib": [512, 2048], "completed_mib": None, "failed_mib": 2048,
                "runs": seed_runs,
            },
        },
    }  # fmt: skip
    lines = memory_limit.table(results).splitlines()
    assert lines[2:] == [
        "| mnist-job | 448 MiB | 416 MiB | 12.5 s | 12.0 s (1024 MiB) |",
        "| seed | > 2048 MiB | 2048 MiB | - | - (2048 MiB) |",
    ]
    results["targets"]["seed"].update(completed_mib=1280, failed_mib=1248)
    assert memory_limit.table(results).endswith("mnist-job needs 0.35x the seed's memory limit")


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
    assert results["headline"] == "mnist_job_cold"
    assert [check["name"] for check in results["targets"]] == [
        name for name, *_ in load_bench().TARGETS
    ]
    for check in results["targets"]:  # one verdict each; one epoch need not pass them
        assert ("PASS " if check["holds"] else "MISS ") + check["name"] in result.stdout
    # The docs quote results.md: the table and the verdicts, as printed.
    markdown = (tmp_path / "results.md").read_text()
    assert "| training loop |" in markdown and "Targets, on the first run:" in markdown
    assert markdown.strip() in result.stdout
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
