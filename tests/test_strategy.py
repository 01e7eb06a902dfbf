"""Strategy choice, cluster derivation and device checks."""

from __future__ import annotations

import json
import re

import pytest

from job.config import TrainConfig
from job.errors import ConfigError, ExitCode
from job.strategy import (
    SINGLE,
    XLA_CPU_OPTIONS,
    choose_strategy,
    cpu_threads,
    resolve_cluster,
    with_xla_cpu_options,
)
from tests.conftest import run_tiny_job

TWO_WORKERS = {
    "cluster": {"worker": ["w0:2222", "w1:2222"]},
    "task": {"type": "worker", "index": 1},
}


@pytest.mark.parametrize(
    ("requested", "workers", "gpus", "expected"),
    [
        ("auto", 1, 0, "default"),
        ("auto", 1, 1, "one-device"),
        ("auto", 1, 4, "mirrored"),
        ("auto", 2, 0, "multi-worker"),
        ("auto", 3, 8, "multi-worker"),
        ("mirrored", 1, 0, "mirrored"),
        ("one-device", 2, 0, "one-device"),
        ("default", 1, 2, "default"),
    ],
)
def test_choose_strategy(requested, workers, gpus, expected):
    cluster = resolve_cluster(TrainConfig(), environ={}) if workers == 1 else None
    if workers > 1:
        spec = {"worker": [f"w{i}:2222" for i in range(workers)]}
        environ = {"TF_CONFIG": json.dumps({"cluster": spec, "task": {"type": "worker"}})}
        cluster = resolve_cluster(TrainConfig(), environ=environ)
    assert choose_strategy(requested, cluster, gpus) == expected


def test_tf_config_cluster():
    cluster = resolve_cluster(TrainConfig(), environ={"TF_CONFIG": json.dumps(TWO_WORKERS)})
    assert (cluster.num_workers, cluster.task_index, cluster.is_chief) == (2, 1, False)
    assert cluster.is_multi_worker
    assert cluster.source == "TF_CONFIG"


def test_tf_config_with_a_chief_task():
    tf_config = {
        "cluster": {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]},
        "task": {"type": "chief", "index": 0},
    }
    cluster = resolve_cluster(TrainConfig(), environ={"TF_CONFIG": json.dumps(tf_config)})
    assert cluster.num_workers == 3 and cluster.is_chief


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", "not valid cluster JSON"),
        ("[]", "not valid cluster JSON"),
        ({"cluster": {}, "task": {"type": "worker"}}, "task type 'worker' is not in"),
        ({"cluster": ["w0:2222"], "task": {}}, "must map task types"),
        # A string, not a list: TensorFlow would split it into characters.
        ({"cluster": {"worker": "w0:2222"}, "task": {}}, 'list of "host:port"'),
        ({"cluster": {"worker": ["w0"]}, "task": {}}, 'list of "host:port"'),
        ({"cluster": {"worker": ["w0:2222"]}, "task": {"index": "x"}}, "must be a whole number"),
        # int() would make these worker 1, which then waits for peers forever.
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": 1.7}}, "whole number, got 1.7"),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": True}}, "got True"),
        # Past the end: it would train alone, not as the chief, and write nothing.
        ({"cluster": {"worker": ["w0:2222"]}, "task": {"index": 5}}, "index 5 is out of range"),
    ],
)
def test_bad_tf_config_is_a_config_error(tf_config, message):
    raw = tf_config if isinstance(tf_config, str) else json.dumps(tf_config)
    with pytest.raises(ConfigError, match="TF_CONFIG") as err:
        resolve_cluster(TrainConfig(), environ={"TF_CONFIG": raw})
    assert message in str(err.value)


def test_indexed_job_cluster_is_derived_from_the_pod():
    config = TrainConfig(num_workers=3, worker_service="mnist-workers", worker_port=2345)
    environ = {"JOB_COMPLETION_INDEX": "2", "HOSTNAME": "mnist-multi-2"}
    cluster = resolve_cluster(config, environ=environ)
    assert cluster.spec == {
        "worker": [f"mnist-multi-{i}.mnist-workers:2345" for i in range(3)],
    }
    assert (cluster.task_index, cluster.is_chief, cluster.source) == (2, False, "indexed-job")


@pytest.mark.parametrize(
    ("config", "environ", "message"),
    [
        (TrainConfig(num_workers=2, worker_service="s"), {}, "JOB_COMPLETION_INDEX"),
        (TrainConfig(num_workers=2), {"JOB_COMPLETION_INDEX": "0"}, "--worker-service"),
        (
            TrainConfig(num_workers=2, worker_service="s"),
            {"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "mnist-multi-0"},
            "subdomain",
        ),
    ],
)
def test_indexed_job_misconfiguration_is_explained(config, environ, message):
    with pytest.raises(ConfigError, match=message):
        resolve_cluster(config, environ=environ)


def test_single_process_without_cluster():
    assert resolve_cluster(TrainConfig(), environ={}) is SINGLE
    assert SINGLE.is_chief and not SINGLE.is_multi_worker


def test_cpu_threads_follow_the_cgroup_quota(monkeypatch):
    import job.strategy as strategy

    monkeypatch.setattr(strategy, "cpu_limit", lambda: 1.5)
    monkeypatch.setattr(strategy.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpu_threads() == 2
    monkeypatch.setattr(strategy, "cpu_limit", lambda: None)
    assert cpu_threads() == 64


def test_device_gpu_without_gpu_exits_4(tmp_path):
    result = run_tiny_job("train", "--device", "gpu", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == ExitCode.DEVICE, result.stderr
    assert "no GPU is visible to TensorFlow" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_device_cpu_trains_and_records_it(tmp_path):
    result = run_tiny_job(
        "train", "--device", "cpu", "--epochs", "1", "--output-dir", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["devices"]["gpus"] == [] and metrics["devices"]["strategy"] == "default"
    assert "global batch 32 = 32 per replica" in result.stderr


OURS = f"--xla_backend_extra_options={XLA_CPU_OPTIONS}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", OURS),
        ("--xla_dump_to=/tmp/x", f"--xla_dump_to=/tmp/x {OURS}"),
        ("--xla_backend_extra_options=mine", "--xla_backend_extra_options=mine"),  # theirs wins
    ],
)
def test_xla_cpu_options_join_the_users_xla_flags(given, expected):
    assert with_xla_cpu_options(given) == expected


def test_the_training_step_compiles_with_multi_output_fusion(tmp_path):
    """The option reaches XLA: Adam's two moment updates of a weight become one
    kernel with two outputs (a fusion whose result is a tuple)."""
    dump = tmp_path / "xla"
    result = run_tiny_job(
        "train", "--epochs", "1", "--num-images", "0", "--output-dir", str(tmp_path / "out"),
        env={"XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (optimized,) = dump.glob("*train_chunk*cpu_after_optimizations.txt")
    assert re.search(r"= \(f32\[784,128\]\S*, f32\[784,128\]\S*\) fusion\(", optimized.read_text())
