"""Where training runs: devices, CPU threads, XLA's CPU options, the worker
cluster, the strategy.

Order matters in TensorFlow: devices and threads must be configured, and a
multi-worker strategy created, before the first tensor exists. `setup()` does
all of it in that order and is the only entry point the runner uses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from job import jobset, join
from job.config import TrainConfig
from job.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """The workers of a multi-worker run, as TF_CONFIG describes them."""

    spec: dict[str, list[str]]  # task type -> ["host:port", ...]
    task_type: str
    task_index: int
    source: str  # "TF_CONFIG", "kubeflow-trainer", "jobset", "indexed-job" or "single"

    @property
    def num_workers(self) -> int:
        return sum(len(addresses) for addresses in self.spec.values())

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1  # a single process has no spec at all: 0

    @property
    def is_chief(self) -> bool:
        # TensorFlow's convention: the "chief" task if there is one, else worker 0.
        if "chief" in self.spec:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0


SINGLE = Cluster(spec={}, task_type="worker", task_index=0, source="single")


def resolve_cluster(config: TrainConfig, environ=os.environ) -> Cluster:
    """TF_CONFIG if set (Kubeflow, Vertex AI); else a pod of a Kubeflow
    TrainJob or a JobSet (job/jobset.py); else a Kubernetes Indexed Job.

    In an Indexed Job whose pods have `subdomain: <service>`, pod i is named
    `<job>-<i>` and resolves as `<job>-<i>.<service>`, so every worker can
    compute the whole cluster from its own hostname and JOB_COMPLETION_INDEX.
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if raw:
        return _parse_tf_config(raw)
    derived = jobset.cluster(config.num_workers, config.worker_service, config.worker_port, environ)
    if derived:
        workers, index, source = derived
        return Cluster({"worker": workers}, "worker", index, source)
    if config.num_workers == 1:
        return SINGLE
    index = environ.get("JOB_COMPLETION_INDEX")
    if index is None or not index.isdigit():
        raise ConfigError(
            "--num-workers > 1 needs TF_CONFIG or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)"
        )
    if not config.worker_service:
        raise ConfigError("--num-workers > 1 in an Indexed Job needs --worker-service")
    hostname = environ.get("HOSTNAME") or socket.gethostname()
    job_name, _, own_index = hostname.partition(".")[0].rpartition("-")
    if own_index != index:
        raise ConfigError(
            f"hostname {hostname!r} is not <job>-{index}: set the pod's subdomain "
            "and use completionMode: Indexed"
        )
    workers = [
        f"{job_name}-{i}.{config.worker_service}:{config.worker_port}"
        for i in range(config.num_workers)
    ]
    return Cluster({"worker": workers}, "worker", int(index), "indexed-job")


def _parse_tf_config(raw: str) -> Cluster:
    """TF_CONFIG, checked as far as TensorFlow would fail on it less clearly
    (or, for a task index past the cluster's end, train alone and write nothing)."""
    try:
        tf_config = json.loads(raw)
        spec, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        task_type, task_index = task.get("type", "worker"), task.get("index", 0)
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"TF_CONFIG is not valid cluster JSON: {err}") from None
    # int() would take 1.7 or true for worker 1, which then waits for peers forever.
    if type(task_index) is str and task_index.isdigit():
        task_index = int(task_index)
    if type(task_index) is not int:
        raise ConfigError(f"TF_CONFIG task index must be a whole number, got {task_index!r}")
    if not isinstance(spec, dict):
        raise ConfigError(f"TF_CONFIG cluster must map task types to addresses, got {spec!r}")
    for kind, addresses in spec.items():
        if not isinstance(addresses, list) or not all(
            isinstance(address, str) and address.rpartition(":")[2].isdigit()
            for address in addresses
        ):
            raise ConfigError(
                f'TF_CONFIG cluster {kind!r} must be a list of "host:port", got {addresses!r}'
            )
    if task_type not in spec:
        raise ConfigError(f"TF_CONFIG task type {task_type!r} is not in its cluster")
    if not 0 <= task_index < len(spec[task_type]):
        raise ConfigError(
            f"TF_CONFIG task index {task_index} is out of range: its cluster has "
            f"{len(spec[task_type])} {task_type!r} task(s)"
        )
    return Cluster(spec, task_type, task_index, "TF_CONFIG")


def cpu_limit() -> float | None:
    """The container's CPU quota in cores (cgroup v2 or v1), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def cpu_threads() -> int:
    """Cores this process may really use: affinity, capped by the cgroup quota.

    TensorFlow sizes its pools from the host's core count; in a pod limited to
    2 CPUs on a 64-core node that means 64 threads fighting for 2 cores.
    """
    available = len(os.sched_getaffinity(0))
    limit = cpu_limit()
    return max(1, min(available, math.ceil(limit))) if limit else available


def choose_strategy(requested: str, cluster: Cluster, num_gpus: int) -> str:
    if requested != "auto":
        return requested
    if cluster.is_multi_worker:
        return "multi-worker"
    if num_gpus > 1:
        return "mirrored"
    if num_gpus == 1:
        return "one-device"
    return "default"


@dataclass
class Placement:
    """What `setup` decided; the runner logs it and records it in metrics.json."""

    strategy: object  # tf.distribute.Strategy
    strategy_name: str
    cluster: Cluster
    gpus: list[str]
    cpu_threads: int

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def compiles_with_xla(self) -> bool:
        # One device: the whole training chunk compiles into one XLA program.
        # Across devices the step needs TensorFlow's collectives, which XLA
        # cannot hold on CPU, so those strategies run the same step as a graph.
        return self.strategy_name in ("default", "one-device")


def log_placement(placement: Placement, config: TrainConfig) -> None:
    log.info(
        "Strategy %s: %d replica(s) on %s; global batch %d = %d per replica; %d CPU threads",
        placement.strategy_name,
        placement.num_replicas,
        ", ".join(placement.gpus) or "CPU",
        config.batch_size,
        config.batch_size // placement.num_replicas,
        placement.cpu_threads,
        extra={
            "event": "start",
            "strategy": placement.strategy_name,
            "replicas": placement.num_replicas,
            "gpus": placement.gpus,
            "cpu_threads": placement.cpu_threads,
            "config": config.to_dict(),
        },
    )


# XLA's CPU multi-output fusion, off by default in TensorFlow 2.21: it updates
# both of Adam's moments of a weight in one kernel instead of two. Same math
# (with --deterministic, bit for bit the same weights; without, they differ in
# the last bits, as any change of fusion may); the seed's run compiles ~0.03 s
# faster and steps ~4% faster. The GPU backend ignores the option.
XLA_CPU_OPTIONS = "xla_cpu_use_multi_output_fusion"


def with_xla_cpu_options(xla_flags: str) -> str:
    """XLA_FLAGS with our backend options added, unless it sets its own."""
    if "--xla_backend_extra_options" in xla_flags:
        return xla_flags
    return f"{xla_flags} --xla_backend_extra_options={XLA_CPU_OPTIONS}".strip()


def setup(config: TrainConfig, cluster: Cluster, strategy=None) -> Placement:
    """Configure TensorFlow for this run and build the strategy (or use the
    injected one, for tests)."""
    # XLA reads XLA_FLAGS once, when it first compiles: later in the run.
    os.environ["XLA_FLAGS"] = with_xla_cpu_options(os.environ.get("XLA_FLAGS", ""))
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if config.device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    elif config.device == "gpu" and not gpus:
        raise DeviceError(
            "--device gpu: no GPU is visible to TensorFlow (check the NVIDIA driver, "
            "CUDA_VISIBLE_DEVICES and the pod's nvidia.com/gpu limit)"
        )
    elif not gpus:
        log.info("No GPU is visible to TensorFlow: training on CPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)

    threads = cpu_threads()
    if threads < (os.cpu_count() or threads):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    if strategy is not None:
        name = "injected"
    else:
        name = choose_strategy(config.strategy, cluster, len(gpus))
        strategy = _make_strategy(name, cluster, gpus, config.join_timeout)
    return Placement(strategy, name, cluster, [gpu.name for gpu in gpus], threads)


def _make_strategy(name: str, cluster: Cluster, gpus: list, join_timeout: float):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    # multi-worker; with no cluster it is a valid one-worker group.
    resolver = None
    if cluster.num_workers:
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster.spec),
            task_type=cluster.task_type,
            task_id=cluster.task_index,
            rpc_layer="grpc",
        )
        log.info(
            "Multi-worker cluster from %s: %s, this is %s %d",
            cluster.source,
            ", ".join(a for addrs in cluster.spec.values() for a in addrs),
            cluster.task_type,
            cluster.task_index,
        )
        # TensorFlow's constructor waits for every worker with no deadline and
        # deaf to SIGTERM: so the workers meet first (job/join.py).
        join.meet(cluster.spec, cluster.task_type, cluster.task_index, join_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
