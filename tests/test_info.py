"""`mnist-job info`: what a pod's job sees, reported without changing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.config import TrainConfig
from job.info import LIBDEVICE, collect, hints, text, to_json, xla_gpu_tools
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
    assert set(info["xla_gpu_tools"]) == {"cuda_data_dir", "ptxas", "libdevice"}


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


def cuda_dir(root: Path, ptxas: bool = True, libdevice: bool = True) -> Path:
    """A CUDA dir laid out as nvidia-cuda-nvcc-cu12 installs it."""
    if ptxas:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "ptxas").write_text("#!/bin/sh\n")
        (root / "bin" / "ptxas").chmod(0o755)
    if libdevice:
        (root / LIBDEVICE).parent.mkdir(parents=True)
        (root / LIBDEVICE).write_bytes(b"BC")
    return root


def test_ptxas_and_libdevice_where_xla_flags_point(tmp_path):
    """The CUDA image's setting: XLA_FLAGS names the dir; both are reported
    by path, in the text and in the JSON."""
    nvcc = cuda_dir(tmp_path / "cuda_nvcc")
    environ = {"XLA_FLAGS": f"--xla_dump_to=/x --xla_gpu_cuda_data_dir={nvcc}", "PATH": ""}
    tools = xla_gpu_tools(environ, cuda_roots=[])
    assert tools == {
        "cuda_data_dir": str(nvcc),
        "ptxas": str(nvcc / "bin" / "ptxas"),
        "libdevice": str(nvcc / LIBDEVICE),
    }
    info = collect(TrainConfig(output_dir=tmp_path), environ)
    assert info["environment"]["XLA_FLAGS"] == environ["XLA_FLAGS"]
    info["xla_gpu_tools"] = tools
    assert f"ptxas: {nvcc / 'bin' / 'ptxas'}" in text(info).splitlines()
    assert f"libdevice: {nvcc / LIBDEVICE}" in text(info).splitlines()
    assert json.loads(to_json(info))["xla_gpu_tools"] == tools


def test_ptxas_on_path_and_libdevice_in_pips_cuda_nvcc(tmp_path):
    """Without XLA_FLAGS, XLA takes ptxas from PATH and libdevice from the
    CUDA roots (pip's nvidia/cuda_nvcc); a ptxas that cannot run is skipped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ptxas").write_text("not executable")
    on_path = cuda_dir(tmp_path / "cuda", libdevice=False) / "bin"
    pip_nvcc = cuda_dir(tmp_path / "site-packages" / "nvidia" / "cuda_nvcc", ptxas=False)
    environ = {"PATH": f"{bin_dir}:{on_path}"}
    tools = xla_gpu_tools(environ, cuda_roots=[tmp_path / "missing", pip_nvcc])
    assert tools == {
        "cuda_data_dir": None,
        "ptxas": str(on_path / "ptxas"),
        "libdevice": str(pip_nvcc / LIBDEVICE),
    }


def test_missing_ptxas_or_libdevice_is_reported_with_a_hint_for_cuda_builds(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    nvcc = cuda_dir(tmp_path / "cuda_nvcc", libdevice=False)  # ptxas only
    environ = {"XLA_FLAGS": f"--xla_gpu_cuda_data_dir={nvcc}", "PATH": str(empty)}
    tools = xla_gpu_tools(environ, cuda_roots=[])
    assert tools["ptxas"] == str(nvcc / "bin" / "ptxas") and tools["libdevice"] is None

    info = collect(TrainConfig(output_dir=tmp_path), {})
    info["xla_gpu_tools"] = xla_gpu_tools({"PATH": str(empty)}, cuda_roots=[])
    assert info["xla_gpu_tools"] == {"cuda_data_dir": None, "ptxas": None, "libdevice": None}
    lines = text(info).splitlines()
    assert "ptxas: not found" in lines and "libdevice: not found" in lines
    # A CPU-only TensorFlow never needs them; a CUDA build is told what to do.
    info["tensorflow"] = {**info["tensorflow"], "cuda_build": False}
    assert not any("libdevice" in hint for hint in hints(info))
    info["tensorflow"] = {**info["tensorflow"], "cuda_build": True}
    (hint,) = [hint for hint in hints(info) if "libdevice" in hint]
    assert "--xla_gpu_cuda_data_dir" in hint and "nvidia-cuda-nvcc-cu12" in hint
