"""The cluster of a JobSet's or a Kubeflow TrainJob's pod, from the names and
variables those controllers give it (their pod naming: ../shared/crds/README.md)."""

from __future__ import annotations

import pytest

from job.config import TrainConfig
from job.errors import ConfigError
from job.jobset import cluster
from job.strategy import SINGLE, choose_strategy, resolve_cluster


def jobset_pod(job_index: int, pod_index: int, replicas: int = 1, name: str = "mnist-jobset"):
    return {
        "HOSTNAME": f"{name}-workers-{job_index}-{pod_index}",
        "JOBSET_NAME": name,
        "JOBSET_JOB_INDEX": str(job_index),
        "JOBSET_REPLICATED_JOB_REPLICAS": str(replicas),
        "JOB_COMPLETION_INDEX": str(pod_index),
    }


def trainer_pod(index: int, nodes: int = 2, name: str = "mnist-train"):
    return {
        "HOSTNAME": f"{name}-node-0-{index}",
        "JAX_NUM_PROCESSES": str(nodes),
        "JAX_PROCESS_ID": str(index),
        "JAX_COORDINATOR_ADDRESS": f"{name}-node-0-0.{name}:29500",
        "JOB_COMPLETION_INDEX": str(index),
    }


def test_jobset_pods_agree_on_one_cluster_in_jobset_order():
    config = TrainConfig(num_workers=4, worker_port=2222)
    expected = [f"mnist-jobset-workers-{j}-{i}.mnist-jobset:2222" for j in (0, 1) for i in (0, 1)]
    seen = []
    for job_index in (0, 1):
        for pod_index in (0, 1):
            found = resolve_cluster(config, jobset_pod(job_index, pod_index, replicas=2))
            assert found.spec == {"worker": expected}
            assert found.source == "jobset"
            seen.append(found.task_index)
            assert found.is_chief == (job_index == pod_index == 0)
    assert seen == [0, 1, 2, 3]
    assert choose_strategy("auto", found, num_gpus=0) == "multi-worker"


def test_jobset_subdomain_can_be_named():
    config = TrainConfig(num_workers=2, worker_service="workers", worker_port=2345)
    found = resolve_cluster(config, jobset_pod(0, 1))
    assert found.spec["worker"][0] == "mnist-jobset-workers-0-0.workers:2345"


def test_a_one_worker_jobset_trains_alone():
    assert resolve_cluster(TrainConfig(), jobset_pod(0, 0)) is SINGLE


@pytest.mark.parametrize(
    ("workers", "change", "message"),
    [
        (3, {"JOBSET_REPLICATED_JOB_REPLICAS": "2"}, "not a multiple"),
        (2, {"JOB_COMPLETION_INDEX": "2", "HOSTNAME": "mnist-jobset-workers-0-2"}, "outside"),
        (2, {"HOSTNAME": "mnist-jobset-workers-0-0"}, "hostname"),  # pod 1 named as pod 0
        (2, {"HOSTNAME": "other-workers-0-1"}, "enableDNSHostnames"),
        (2, {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX must be a whole number"),
    ],
)
def test_jobset_misconfiguration_is_one_clear_error(workers, change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_cluster(TrainConfig(num_workers=workers), {**jobset_pod(0, 1), **change})


def test_trainjob_nodes_agree_on_one_cluster_from_the_jax_policy_variables():
    expected = [f"mnist-train-node-0-{i}.mnist-train:29500" for i in range(3)]
    for index in range(3):
        # --num-workers is not needed: the TrainJob's numNodes arrives as JAX_NUM_PROCESSES.
        found = resolve_cluster(TrainConfig(), trainer_pod(index, nodes=3))
        assert found.spec == {"worker": expected}
        assert (found.task_index, found.source) == (index, "kubeflow-trainer")
    assert resolve_cluster(TrainConfig(), trainer_pod(0, nodes=1)) is SINGLE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"JAX_PROCESS_ID": ""}, "needs JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "mnist-train:29500"}, "is not <trainjob>-node-0-0"),
        ({"JAX_PROCESS_ID": "2"}, "out of range"),
        ({"HOSTNAME": "somewhere-else"}, "hostname"),
    ],
)
def test_trainjob_misconfiguration_is_one_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        cluster(1, None, 2222, {**trainer_pod(1), **change})


def test_tf_config_still_wins_and_plain_pods_are_left_alone():
    assert cluster(2, "svc", 2222, {"JOB_COMPLETION_INDEX": "0"}) is None
    tf_config = '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}'
    found = resolve_cluster(TrainConfig(), {**trainer_pod(0), "TF_CONFIG": tf_config})
    assert (found.source, found.task_index) == ("TF_CONFIG", 1)
