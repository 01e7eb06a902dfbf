"""The worker cluster of a pod that JobSet or Kubeflow Trainer v2 started,
derived from what they give the pod: no TF_CONFIG, no init container.

JobSet (`jobset.x-k8s.io/v1alpha2`, `network.enableDNSHostnames: true`)
names the pods of replicated Job `<rjob>` `<jobset>-<rjob>-<jobIndex>-<podIndex>`;
each resolves as `<that name>.<subdomain>`, the subdomain defaulting to the
JobSet's name. JobSet sets no variables of its own, so k8s/jobset.yaml passes
the pod's JobSet labels in through the downward API (JOBSET_NAME,
JOBSET_JOB_INDEX, JOBSET_REPLICATED_JOB_REPLICAS); the Job controller adds
JOB_COMPLETION_INDEX (the pod index). Workers are numbered Job by Job:
global index = jobIndex * podsPerJob + podIndex; worker 0 is the chief.

Kubeflow Trainer v2 runs a TrainJob as a JobSet named after it with one
replicated Job `node`: pods `<trainjob>-node-0-<i>.<trainjob>`. Trainer tells
a pod the node count only through an ML policy's variables; the runtime in
k8s/trainer/ uses the JAX policy, whose three (JAX_NUM_PROCESSES: the
TrainJob's numNodes; JAX_PROCESS_ID: the completion index;
JAX_COORDINATOR_ADDRESS: `<trainjob>-node-0-0.<trainjob>:<port>`) give a
TensorFlow worker all it needs: worker i is node pod i at the same port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from job.errors import ConfigError

JOBSET_VARIABLES = ("JOBSET_NAME", "JOBSET_JOB_INDEX", "JOBSET_REPLICATED_JOB_REPLICAS")
TRAINER_VARIABLES = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")


def cluster(
    num_workers: int,
    worker_service: str | None,
    worker_port: int,
    environ: Mapping[str, str] = os.environ,
) -> tuple[list[str], int, str] | None:
    """(workers as "host:port", this pod's index, source) for a pod of a
    Kubeflow TrainJob or a JobSet of more than one worker; None otherwise."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return _trainer(environ)
    if environ.get("JOBSET_NAME") and num_workers > 1:
        return _jobset(num_workers, worker_service, worker_port, environ)
    return None


def _whole(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = environ.get(name, default)
    if value is None or not value.isdigit():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _hostname(environ: Mapping[str, str]) -> str:
    return (environ.get("HOSTNAME") or socket.gethostname()).partition(".")[0]


def _trainer(environ: Mapping[str, str]) -> tuple[list[str], int, str] | None:
    missing = [name for name in TRAINER_VARIABLES if not environ.get(name)]
    if missing:
        raise ConfigError(f"a Kubeflow Trainer pod needs {', '.join(missing)} (its JAX policy)")
    count = _whole(environ, "JAX_NUM_PROCESSES")
    index = _whole(environ, "JAX_PROCESS_ID")
    address = environ["JAX_COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    first, _, subdomain = host.partition(".")
    prefix, _, zero = first.rpartition("-")
    if not (port.isdigit() and subdomain and prefix and zero == "0"):
        raise ConfigError(
            f"JAX_COORDINATOR_ADDRESS {address!r} is not <trainjob>-node-0-0.<trainjob>:<port>"
        )
    if not 0 <= index < count:
        raise ConfigError(f"JAX_PROCESS_ID {index} is out of range for {count} node(s)")
    hostname = _hostname(environ)
    if hostname != f"{prefix}-{index}":
        raise ConfigError(f"hostname {hostname!r} is not {prefix}-{index}, the Trainer pod's name")
    if count == 1:
        return None
    workers = [f"{prefix}-{i}.{subdomain}:{port}" for i in range(count)]
    return workers, index, "kubeflow-trainer"


def _jobset(
    num_workers: int, worker_service: str | None, worker_port: int, environ: Mapping[str, str]
) -> tuple[list[str], int, str]:
    replicas = _whole(environ, "JOBSET_REPLICATED_JOB_REPLICAS", "1")
    job_index = _whole(environ, "JOBSET_JOB_INDEX", "0")
    pod_index = _whole(environ, "JOB_COMPLETION_INDEX")
    if replicas < 1 or num_workers % replicas:
        raise ConfigError(
            f"--num-workers {num_workers} is not a multiple of the JobSet's "
            f"{replicas} Job(s): set it to replicas x parallelism"
        )
    per_job = num_workers // replicas
    if not (job_index < replicas and pod_index < per_job):
        raise ConfigError(
            f"JobSet pod {job_index}-{pod_index} is outside {replicas} Job(s) of "
            f"{per_job} pod(s): set --num-workers to replicas x parallelism"
        )
    hostname = _hostname(environ)
    prefix, suffix = hostname[: -len(f"-{job_index}-{pod_index}")], f"-{job_index}-{pod_index}"
    if not hostname.endswith(suffix) or not prefix.startswith(environ["JOBSET_NAME"] + "-"):
        raise ConfigError(
            f"hostname {hostname!r} is not {environ['JOBSET_NAME']}-<job>{suffix}: "
            "set the JobSet's network.enableDNSHostnames and completionMode: Indexed"
        )
    subdomain = worker_service or environ["JOBSET_NAME"]
    pods = [f"{prefix}-{j}-{i}" for j in range(replicas) for i in range(per_job)]
    workers = [f"{pod}.{subdomain}:{worker_port}" for pod in pods]
    return workers, job_index * per_job + pod_index, "jobset"
