"""`mnist-job info`: what a pod's job sees, reported without changing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from job.config import TrainConfig
from job.info import collect, hints, text
from tests.conftest import ROOT

TWO_WORKERS = {
    "TF_CONFIG": json.dumps(
        {"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}}
    )
}


def mnist_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CUDA_VISIBLE_DEVICES")
    }
    return subprocess.run(
        [sys.executable, "-m", "job", "info", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},  # never a GPU here
        timeout=120,
    )


def test_json_has_every_field_and_creates_nothing(tmp_path):
    output_dir = tmp_path / "not" / "yet"
    result = mnist_job("--json", "--data-dir", str(tmp_path / "cache"), "--output-dir",
                       str(output_dir), "--compile-cache", str(tmp_path / "xla"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["versions"]) >= {"python", "tensorflow", "keras", "mnist_job"}
    assert set(info["tensorflow"]) >= {"cuda_build", "cuda_version", "cudnn_version", "gpus"}
    assert info["tensorflow"]["gpus"] == []
    assert info["cpus"]["usable"] >= 1 and info["cpus"]["threads_used"] >= 1
    assert "cgroup_limit" in info["cpus"]
    assert info["strategy_auto"] == "default"
    assert info["cluster"]["source"] == "single" and info["cluster"]["is_chief"]
    assert info["data"]["status"] == "missing"
    assert info["output_dir"] == {"path": str(output_dir), "exists": False, "writable": True}
    assert info["compile_cache"] == {
        "path": str(tmp_path / "xla"), "exists": False, "writable": True,
        "programs": 0, "megabytes": 0,
    }  # fmt: skip
    assert not (tmp_path / "not").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "xla").exists()
    assert info["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_text_report_and_cluster_from_tf_config(tmp_path):
    result = mnist_job("--output-dir", str(tmp_path), env=TWO_WORKERS)
    assert result.returncode == 0, result.stderr
    assert "strategy (auto): multi-worker" in result.stdout
    assert "cluster: 2 workers from TF_CONFIG, this is worker 1 (chief: False)" in result.stdout
    assert f"output dir: {tmp_path} writable" in result.stdout


def test_cluster_of_an_indexed_job():
    environ = {"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "train-1"}
    config = TrainConfig(num_workers=3, worker_service="workers", worker_port=2222)
    info = collect(config, environ)
    assert info["cluster"]["source"] == "indexed-job"
    assert info["cluster"]["spec"] == {"worker": [f"train-{i}.workers:2222" for i in range(3)]}
    assert info["cluster"]["task_index"] == 1 and not info["cluster"]["is_chief"]
    assert info["strategy_auto"] == "multi-worker"


@pytest.mark.parametrize(
    ("environ", "options", "error"),
    [
        ({"TF_CONFIG": "{not json"}, {}, "TF_CONFIG is not valid"),
        ({}, {"num_workers": 2}, "JOB_COMPLETION_INDEX"),
        ({"JOB_COMPLETION_INDEX": "0", "HOSTNAME": "x-0"}, {"num_workers": 2}, "worker-service"),
    ],
)
def test_a_bad_cluster_is_reported_not_raised(environ, options, error):
    info = collect(TrainConfig(**options), environ)
    assert error in info["cluster"]["error"]
    assert info["strategy_auto"] is None
    assert "cluster: error:" in text(info)


def test_corrupt_cache_and_unwritable_output_dir(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not an npz")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    info = collect(TrainConfig(data_dir=tmp_path, output_dir=blocker / "out"), {})
    assert info["data"]["status"] == "corrupt"
    assert info["output_dir"]["writable"] is False
    assert any("writable --output-dir" in hint for hint in hints(info))
    assert "NOT writable" in text(info)


def test_a_finished_run_is_pointed_out(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    info = collect(TrainConfig(output_dir=tmp_path), {})
    assert info["output_dir"]["writable"] and "--overwrite" in info["output_dir"]["detail"]


def test_gpu_device_without_a_cuda_build_gets_a_hint(tmp_path):
    info = collect(TrainConfig(output_dir=tmp_path), {})
    info["nvidia_devices"] = ["/dev/nvidia0"]
    info["tensorflow"] = {**info["tensorflow"], "cuda_build": False, "gpus": []}
    assert any("CPU-only build" in hint for hint in hints(info))


def test_the_compile_cache_is_counted_or_reported_off(tmp_path):
    entry = tmp_path / "xla" / "tf2.21.0-0123456789abcdef" / f"program.{'0' * 64}.pb"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x" * 2**20)
    (entry.parent / "frozen_graph.pb").write_bytes(b"a user's file, not the cache's")
    info = collect(TrainConfig(output_dir=tmp_path, compile_cache=tmp_path / "xla"), {})
    assert info["compile_cache"]["programs"] == 1
    assert "1 compiled program(s), 1.0 MB" in text(info)
    off = collect(TrainConfig(output_dir=tmp_path, compile_cache=None), {})
    assert off["compile_cache"] is None and "compile cache: off" in text(off)
