"""The Kubernetes manifests in k8s/: valid for the API server, consistent with
the job they run, and working when a kubelet runs them.

No cluster here: the schemas come from kubernetes-validate and, for JobSet and
Kubeflow Trainer, from their CRDs (K8S_CRDS, by default ../shared/crds: the
tests skip without them, except in CI); the docker tests run each pod
template with docker as a kubelet would (tests/kubelet.py).
The docker tests shrink the runs through the same MNIST_JOB_* variables the
manifests use (MNIST_JOB_EPOCHS=1, MNIST_JOB_MAX_TRAIN_SAMPLES=2000) to stay fast.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import kubernetes_validate
import pytest

from job.cli import train
from job.config import TrainConfig, from_options
from job.errors import ExitCode
from job.strategy import resolve_cluster
from tests import kubelet, status_server
from tests.conftest import ROOT
from tests.docker_helpers import CONTAINER_GID, CONTAINER_UID, require_image
from tests.stores import S3_CREDENTIALS, moto_server

K8S = ROOT / "k8s"
MANIFESTS = sorted([*K8S.glob("*.yaml"), *K8S.glob("trainer/*.yaml")])
NAMES = [str(p.relative_to(K8S)) for p in MANIFESTS]
JOB_FILES = ["job.yaml", "job-gpu.yaml", "multi-worker.yaml"]
CRDS = Path(os.environ.get("K8S_CRDS") or ROOT.parent / "shared" / "crds")
# Oldest with podFailurePolicy GA (1.31) and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
ARTIFACTS = [
    "model.keras",
    "saved_model/saved_model.pb",
    "predictions.png",
    "metrics.json",
    "checkpoints/latest.npz",
    "tensorboard/train",
    "tensorboard/validation",
]
WORKLOADS = ("Job", "Deployment", "Pod", "JobSet", "ClusterTrainingRuntime")
TRAINING = ("Job", "JobSet", "TrainJob")  # what Kueue admits
SMALL_RUN = {"MNIST_JOB_EPOCHS": "1", "MNIST_JOB_MAX_TRAIN_SAMPLES": "2000"}


def objects(name: str) -> list[dict]:
    return kubelet.load(K8S / name)


def job_of(name: str) -> dict:
    return kubelet.find(objects(name), "Job")


def trainer(workload: dict) -> dict:
    return next(c for c in kubelet.pod_template(workload)["containers"] if c["name"] == "mnist-job")


def env_of(container: dict) -> dict[str, str]:
    """Its plain values (the downward API's come from the pod: kubelet.py)."""
    return {var["name"]: var["value"] for var in container.get("env", []) if "value" in var}


def all_workloads():
    for name in NAMES:
        for obj in objects(name):
            if obj["kind"] in WORKLOADS:
                yield name, obj


# -- schemas and lint -------------------------------------------------------------


def test_the_manifests_are_the_expected_ones():
    assert set(NAMES) >= {*JOB_FILES, "tensorboard.yaml", "jobset.yaml", "trainer/trainjob.yaml"}


@functools.cache
def k8s_validate():
    """scripts/k8s_validate.py, the checker of `make k8s-validate`."""
    spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "scripts/k8s_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_crds() -> Path:
    if not (CRDS / "jobset.x-k8s.io_jobsets.yaml").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no JobSet/Trainer CRDs in {CRDS}: CI must validate the custom resources")
        pytest.skip(f"no JobSet/Trainer CRDs in {CRDS} (set K8S_CRDS)")
    return CRDS


@pytest.mark.parametrize("path", MANIFESTS, ids=NAMES)
def test_manifest_matches_the_kubernetes_schemas_and_crds(path):
    """Strict: core objects for the oldest and newest Kubernetes; JobSet,
    TrainJob and runtimes against their CRDs, their Job templates as core Jobs."""
    problems = k8s_validate().validate([path], require_crds(), KUBERNETES_VERSIONS, None)
    assert problems == []


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        # A misspelled field: the API server would drop it silently.
        ("jobset.yaml", "enableDNSHostnames:", "enableDnsHostnames:", "'enableDnsHostnames' was"),
        ("trainer/trainjob.yaml", "numNodes: 2", "numNode: 2", "'numNode' was unexpected"),
        ("trainer/runtime.yaml", "mlPolicy:", "mlPolicies:", "'mlPolicies' was unexpected"),
        # A core field of the wrong type inside the pod template.
        (
            "jobset.yaml",
            "containerPort: 2222",
            'containerPort: "2222"',
            "as a Job: Kubernetes 1.31.0: spec.template.spec.containers.0.ports.0",
        ),
        ("trainer/runtime.yaml", "runAsUser: 10001", "runAsUser: root", "runAsUser"),
    ],
)
def test_validation_catches_mistakes_in_custom_resources(tmp_path, name, old, new, message):
    text = (K8S / name).read_text()
    assert old in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new, 1))
    problems = k8s_validate().validate([broken], require_crds(), KUBERNETES_VERSIONS, None)
    assert any(message in problem for problem in problems), problems


def test_manifests_pass_yamllint():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "--format",
            "parsable",
            *map(str, MANIFESTS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_each_file_stands_alone(name):
    """`kubectl apply -f` on one file: every claim a Job mounts is in the
    same file (TensorBoard reads the claim of k8s/job.yaml, documented)."""
    defined = {o["metadata"]["name"] for o in objects(name) if o["kind"] == "PersistentVolumeClaim"}
    everywhere = {
        o["metadata"]["name"]
        for p in MANIFESTS
        for o in kubelet.load(p)
        if o["kind"] == "PersistentVolumeClaim"
    }
    for obj in objects(name):
        if obj["kind"] not in WORKLOADS:
            continue
        for volume in kubelet.pod_template(obj).get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is None:
                continue
            if obj["kind"] == "Job":
                assert claim in defined, f"{name}: {claim} is not defined in the same file"
            else:
                assert claim in everywhere, f"{name}: no manifest defines {claim}"


# -- consistency with the job -------------------------------------------------------


def parse_train(container: dict, monkeypatch, extra_env: dict | None = None) -> TrainConfig:
    """Parse the container's args and env with the real CLI, as the image's
    `mnist-job` entrypoint would; the TrainConfig that `train` would run."""
    for key in list(os.environ):
        if key.startswith("MNIST_JOB_"):
            monkeypatch.delenv(key)
    for key, value in {**env_of(container), **(extra_env or {})}.items():
        monkeypatch.setenv(key, value)
    args = container.get("args", ["train"])
    assert "command" not in container, "the Jobs use the image's entrypoint, mnist-job"
    assert args[0] == "train"
    try:
        ctx = train.make_context("mnist-job train", list(args[1:]))
    except click.ClickException as err:
        pytest.fail(f"{container['name']}: the CLI rejects the manifest: {err.format_message()}")
    options = {k: v for k, v in ctx.params.items() if k not in ("verbose", "sagemaker_model_dir")}
    return from_options(options, {})


@pytest.mark.parametrize("name", JOB_FILES)
def test_env_vars_are_real_options_and_parse(name, monkeypatch):
    container = trainer(job_of(name))
    known = {
        var
        for param in train.params
        if isinstance(param, click.Option)
        for var in ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
    }
    for var in env_of(container):
        if var.startswith("MNIST_JOB_"):
            assert var in known, f"{name}: {var} is not an option of mnist-job train"
    config = parse_train(container, monkeypatch)
    env = env_of(container)
    assert str(config.output_dir) == env["MNIST_JOB_OUTPUT_DIR"]
    assert config.epochs == int(env["MNIST_JOB_EPOCHS"])


def test_a_mistyped_env_value_would_be_caught(monkeypatch):
    """The parse above fails for a value the job would reject."""
    container = trainer(job_of("job.yaml"))
    container["env"].append({"name": "MNIST_JOB_DEVICE", "value": "tpu"})
    with pytest.raises(pytest.fail.Exception, match="tpu"):
        parse_train(container, monkeypatch)


@pytest.mark.parametrize("name", JOB_FILES)
def test_output_volume_is_mounted_at_the_output_dir(name, monkeypatch):
    job = job_of(name)
    container = trainer(job)
    config = parse_train(container, monkeypatch)
    spec = kubelet.pod_template(job)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "persistentVolumeClaim" in mounts[str(config.output_dir)]
    assert "emptyDir" in mounts["/tmp"], "HOME and the caches live in /tmp (read-only root)"


@pytest.mark.parametrize("name", JOB_FILES)
def test_pod_failure_policy_uses_the_documented_exit_codes(name):
    job = job_of(name)
    container = trainer(job)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    documented = {int(code) for code in ExitCode}
    for rule in rules:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == container["name"]
            assert set(rule["onExitCodes"]["values"]) <= documented
    # What the Job controller does with each of the job's exit codes.
    expected = {
        ExitCode.FAILURE: "Count",  # retried, counts against the backoff limit
        ExitCode.USAGE: "FailJob",
        ExitCode.DATA: "FailJob",
        ExitCode.DEVICE: "FailJob",
        ExitCode.TERMINATED: "Ignore",  # checkpoint written; the next pod resumes
        137: "Count",  # OOM-killed, or killed after the grace period
    }
    for code, action in expected.items():
        assert kubelet.failure_action(job, int(code), container="mnist-job") == action, code
    # Preempted or evicted: never counted, whatever the exit code.
    for code in (1, 137, 143):
        assert kubelet.failure_action(job, code, ("DisruptionTarget",)) == "Ignore"
    assert kubelet.failure_action(job, 0) is None


@pytest.mark.parametrize("name", JOB_FILES)
def test_jobs_retry_within_bounds(name):
    spec = job_of(name)["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec.get("backoffLimit", 0) > 0 or spec.get("backoffLimitPerIndex", 0) > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    # The SIGTERM checkpoint took up to 2.7 s (one pod) and 8.9 s (two
    # workers sharing 2 cores); the docker tests stop pods with this grace
    # period and expect exit 143, not a SIGKILL.
    assert 15 <= pod["terminationGracePeriodSeconds"] <= 30


def test_image_tags_are_the_ones_make_builds():
    """docker/docker.mk builds $(IMAGE):<tags> with `$(call docker_build,<extra>,<tags>)`."""
    makefile = (ROOT / "docker" / "docker.mk").read_text()
    repository = re.search(r"^IMAGE \?= (\S+)", makefile, re.MULTILINE).group(1)
    built = {
        extra: tags.split()
        for extra, tags in re.findall(r"\$\(call docker_build,(\w+),([^)]*)\)", makefile)
    }
    assert set(built) == {"cpu", "cuda"}
    images = {
        name: c["image"]
        for name, workload in all_workloads()
        for c in kubelet.pod_template(workload)["containers"]
    }
    for name, image in images.items():
        image_repository, _, tag = image.rpartition(":")
        assert image_repository == repository, f"{name}: {image}"
        assert tag in built["cpu"] + built["cuda"], f"{name}: make builds no {image}"
    assert images["job-gpu.yaml"] == f"{repository}:cuda"
    assert images["job.yaml"] == f"{repository}:cpu"


@pytest.mark.parametrize("name", NAMES)
def test_pods_run_restricted(name):
    """The restricted Pod Security Standard, plus a read-only root and the
    image's uid:gid (>= 10000) with fsGroup so the volume is writable."""
    for obj in objects(name):
        if obj["kind"] not in WORKLOADS:
            continue
        spec = kubelet.pod_template(obj)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        user = (pod_security["runAsUser"], pod_security["runAsGroup"])
        assert user == (CONTAINER_UID, CONTAINER_GID) and min(user) >= 10000
        assert pod_security["fsGroup"] == CONTAINER_GID
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert not security["capabilities"].get("add")
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
            # Guaranteed QoS (the last pods a node evicts), and a quota
            # (Kueue's) counts what the pod may really use.
            for key in ("cpu", "memory"):
                assert resources["requests"][key] == resources["limits"][key], name


def test_gpu_job_asks_for_a_gpu_and_insists_on_it(monkeypatch):
    job = job_of("job-gpu.yaml")
    container = trainer(job)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    tolerations = kubelet.pod_template(job)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # No GPU visible -> exit 4 -> FailJob, instead of training on the CPU.
    assert parse_train(container, monkeypatch).device == "gpu"
    assert kubelet.failure_action(job, ExitCode.DEVICE) == "FailJob"


def test_multi_worker_cluster_matches_the_service(monkeypatch):
    docs = objects("multi-worker.yaml")
    service = kubelet.find(docs, "Service")
    job = kubelet.find(docs, "Job")
    spec, pod = job["spec"], kubelet.pod_template(job)
    container = trainer(job)
    config = parse_train(container, monkeypatch)

    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == config.num_workers > 1
    assert config.strategy in ("multi-worker", "auto")
    # DNS: pods are <job>-<i>.<subdomain>; the subdomain is the headless Service.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"] == config.worker_service
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    (port,) = service["spec"]["ports"]
    assert port["port"] == config.worker_port
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == config.worker_port
    # What each pod derives from its hostname and index: the cluster the
    # Service names.
    job_name = job["metadata"]["name"]
    expected = [
        f"{job_name}-{i}.{service['metadata']['name']}:{port['port']}"
        for i in range(config.num_workers)
    ]
    for index in range(config.num_workers):
        environ = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{job_name}-{index}"}
        cluster = resolve_cluster(config, environ)
        assert cluster.spec == {"worker": expected}
        assert cluster.task_index == index
        assert cluster.is_chief == (index == 0)
    # All workers read the chief's checkpoints: one volume for all of them.
    claim = kubelet.find(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", JOB_FILES)
def test_a_replacement_pod_waits_for_the_one_it_replaces(name):
    # Else it could start while the old pod still writes the same volume.
    assert job_of(name)["spec"]["podReplacementPolicy"] == "Failed"


def test_multi_worker_failures_restart_the_group_not_loop():
    spec = job_of("multi-worker.yaml")["spec"]
    # One index out of retries fails the Job at once: the others cannot
    # finish without it.
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["maxFailedIndexes"] == 0
    # A replacement waits for the pod it replaces: one pod per hostname.
    assert spec["podReplacementPolicy"] == "Failed"


GROUPS = {  # file -> the workload that runs a group of workers
    "jobset.yaml": "JobSet",
    "trainer/runtime.yaml": "ClusterTrainingRuntime",
}


@pytest.mark.parametrize("name", GROUPS)
def test_a_failed_worker_restarts_the_whole_group_within_bounds(name):
    """JobSet's failurePolicy on the child Job's failure, as the controllers
    apply them: configuration errors fail at once, preemption restarts the
    group without using a restart, a crash restarts it and counts."""
    workload = kubelet.find(objects(name), GROUPS[name])
    job_spec = kubelet.replicated_jobs(workload)[0]["template"]["spec"]
    container = kubelet.pod_template(workload)["containers"][0]["name"]
    assert job_spec["backoffLimit"] == 0  # no pod is replaced alone
    expected = {
        ExitCode.USAGE: "FailJobSet",
        ExitCode.DATA: "FailJobSet",
        ExitCode.DEVICE: "FailJobSet",
        ExitCode.TERMINATED: "RestartJobSetAndIgnoreMaxRestarts",
        ExitCode.FAILURE: "RestartJobSet",  # counts against maxRestarts
        137: "RestartJobSet",
    }
    for code, action in expected.items():
        assert kubelet.jobset_action(workload, int(code), container=container) == action, code
    for code in (1, 137, 143):
        disrupted = kubelet.jobset_action(workload, code, ("DisruptionTarget",), container)
        assert disrupted == "RestartJobSetAndIgnoreMaxRestarts"
    spec = workload["spec"] if GROUPS[name] == "JobSet" else workload["spec"]["template"]["spec"]
    assert 1 <= spec["failurePolicy"]["maxRestarts"] <= 5
    assert job_spec["activeDeadlineSeconds"] > 0


def jobset_pod_env(workload: dict, job_index: int, pod_index: int, name: str) -> dict:
    """The env a JobSet's pod sees: its downward-API values as JobSet labels
    the pod, and JOB_COMPLETION_INDEX from the Job controller."""
    replicated = kubelet.replicated_jobs(workload)[0]
    labels = {
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
        "jobset.sigs.k8s.io/job-index": str(job_index),
        "jobset.sigs.k8s.io/replicatedjob-replicas": str(replicated.get("replicas", 1)),
    }
    env = {"JOB_COMPLETION_INDEX": str(pod_index)}
    for var in kubelet.pod_template(workload)["containers"][0]["env"]:
        path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        found = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if found:
            env[var["name"]] = labels[found.group(1)]
    env["HOSTNAME"] = f"{name}-{replicated['name']}-{job_index}-{pod_index}"
    return env


def test_jobset_workers_derive_one_cluster_from_what_jobset_gives(monkeypatch):
    jobset = kubelet.find(objects("jobset.yaml"), "JobSet")
    name = jobset["metadata"]["name"]
    replicated = kubelet.replicated_jobs(jobset)[0]
    spec = replicated["template"]["spec"]
    container = trainer(jobset)
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"]
    workers = replicated["replicas"] * spec["parallelism"]
    addresses = set()
    for index in range(workers):
        environ = jobset_pod_env(
            jobset, index // spec["parallelism"], index % spec["parallelism"], name
        )
        config = parse_train(container, monkeypatch, {})
        assert config.num_workers == workers
        cluster = resolve_cluster(config, environ)
        assert (cluster.source, cluster.task_index, cluster.is_chief) == (
            "jobset",
            index,
            index == 0,
        )
        addresses.add(tuple(cluster.spec["worker"]))
    (cluster_addresses,) = addresses
    assert cluster_addresses[0] == f"{name}-{replicated['name']}-0-0.{name}:{config.worker_port}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config.worker_port


def test_trainjob_nodes_derive_one_cluster_from_what_trainer_gives(monkeypatch):
    runtime = kubelet.find(objects("trainer/runtime.yaml"), "ClusterTrainingRuntime")
    trainjob = kubelet.find(objects("trainer/trainjob.yaml"), "TrainJob")
    assert trainjob["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert "jax" in runtime["spec"]["mlPolicy"]  # for its variables: job/jobset.py
    replicated = kubelet.replicated_jobs(runtime)[0]
    assert replicated["name"] == "node"  # Trainer's names for the trainer Job
    assert replicated["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    (container,) = kubelet.pod_template(runtime)["containers"]
    assert container["name"] == "node"
    name, nodes = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]["numNodes"]
    trainjob_env = {v["name"]: v["value"] for v in trainjob["spec"]["trainer"].get("env", [])}
    for index in range(nodes):
        environ = {  # what Trainer's JAX policy sets (../shared/crds/README.md)
            "HOSTNAME": f"{name}-node-0-{index}",
            "JAX_NUM_PROCESSES": str(nodes),
            "JAX_PROCESS_ID": str(index),
            "JAX_COORDINATOR_ADDRESS": f"{name}-node-0-0.{name}:29500",
        }
        plain = {**env_of(container), **trainjob_env}
        plain["MNIST_JOB_OUTPUT_DIR"] = f"/outputs/{name}"
        config = parse_train({**container, "env": []}, monkeypatch, plain)
        cluster = resolve_cluster(config, environ)
        assert cluster.spec["worker"] == [f"{name}-node-0-{i}.{name}:29500" for i in range(nodes)]
        assert (cluster.source, cluster.task_index) == ("kubeflow-trainer", index)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 29500}


def pod_labels(workload: dict, name: str) -> dict:
    """The labels a workload's pods carry: the template's and the controller's."""
    labels = dict(workload["spec"].get("template", {}).get("metadata", {}).get("labels", {}))
    if workload["kind"] == "Pod":
        labels = dict(workload["metadata"]["labels"])
    if workload["kind"] in kubelet.REPLICATED:
        template = kubelet.replicated_jobs(workload)[0]["template"]["spec"]["template"]
        labels = dict(template["metadata"]["labels"])
        labels["jobset.sigs.k8s.io/jobset-name"] = name
    return labels


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "trainer/runtime.yaml"])
def test_every_pod_is_fenced_by_a_network_policy(name):
    """Training pods: ingress only from their own group on the gRPC port;
    egress only to that group and DNS (Trainer's: also its status server).
    TensorBoard: ingress on its port only. Others: nothing in or out."""
    docs = objects(name)
    workloads = [o for o in docs if o["kind"] in WORKLOADS]
    if name == "trainer/trainjob.yaml":
        trainjob = kubelet.find(docs, "TrainJob")
        runtime = kubelet.find(objects("trainer/runtime.yaml"), "ClusterTrainingRuntime")
        workloads = [{**runtime, "metadata": trainjob["metadata"]}]
    policies = [o for o in docs if o["kind"] == "NetworkPolicy"]
    assert workloads and policies
    for workload in workloads:
        labels = pod_labels(workload, workload["metadata"]["name"])
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        ports = kubelet.pod_template(workload)["containers"][0].get("ports", [])
        if not ports:
            assert spec["ingress"] == [] and spec["egress"] == []
            continue
        (port,) = [p["containerPort"] for p in ports]
        for rule in spec["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [port]
            assert all(selects(peer["podSelector"], labels) for peer in rule.get("from", []))
        # Outputs in a bucket: HTTPS to the object store, and nothing else.
        store = [r for r in spec["egress"] if any("ipBlock" in t for t in r["to"])]
        assert [p["port"] for r in store for p in r["ports"]] == ([443] if store else [])
        assert bool(store) == name.endswith("-bucket.yaml")
        egress = [r for r in spec["egress"] if r not in store]
        peers = [r for r in egress if all("namespaceSelector" not in t for t in r["to"])]
        if workload["kind"] == "Deployment":
            assert spec["egress"] == [] and "from" not in spec["ingress"][0]
            continue
        (peer_rule,) = peers
        assert all(selects(t["podSelector"], labels) for t in peer_rule["to"])
        assert [p["port"] for p in peer_rule["ports"]] == [port]
        others = [r for r in egress if r is not peer_rule]
        namespaces = {t["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                      for r in others for t in r["to"]}  # fmt: skip
        assert namespaces <= {"kube-system", "kubeflow-system"}
        assert {53} <= {p["port"] for r in others for p in r["ports"]}


def test_training_workloads_take_the_kueue_queue_label_in_one_line(tmp_path):
    """`kubectl label --local` (no cluster needed) puts the LocalQueue label on
    every training workload of a file; they stay valid, and the files apply
    as they are on a cluster without Kueue (no label, no suspend)."""
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl on PATH")
    for name in NAMES:
        if not any(o["kind"] in TRAINING for o in objects(name)):
            continue
        for obj in objects(name):
            assert "kueue.x-k8s.io/queue-name" not in obj["metadata"].get("labels", {})
            assert not obj.get("spec", {}).get("suspend")
        labelled = subprocess.run(
            ["kubectl", "label", "--local", "-f", str(K8S / name), "-o", "yaml",
             "kueue.x-k8s.io/queue-name=team-a"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        out = tmp_path / name.replace("/", "-")
        out.write_text(labelled)
        docs = kubelet.load(out)
        if len(docs) == 1 and docs[0]["kind"] == "List":
            docs = docs[0]["items"]
        for obj in docs:
            if obj["kind"] in TRAINING:
                assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_tensorboard_serves_the_jobs_logs_read_only():
    docs = objects("tensorboard.yaml")
    deployment = kubelet.find(docs, "Deployment")
    service = kubelet.find(docs, "Service")
    spec = kubelet.pod_template(deployment)
    (container,) = spec["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()

    job = job_of("job.yaml")
    job_env = env_of(trainer(job))
    logdir = TrainConfig(output_dir=Path(job_env["MNIST_JOB_OUTPUT_DIR"])).tensorboard_path
    assert container["command"] == ["tensorboard"]
    assert f"--logdir={logdir}" in container["args"]
    port = next(a for a in container["args"] if a.startswith("--port=")).split("=")[1]
    assert {p["containerPort"] for p in container["ports"]} == {int(port)}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (outputs,) = [
        m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]
    ]
    assert outputs["readOnly"] is True
    assert volumes[outputs["name"]]["persistentVolumeClaim"] == {
        "claimName": kubelet.find(objects("job.yaml"), "PersistentVolumeClaim")["metadata"]["name"],
        "readOnly": True,
    }
    assert logdir.is_relative_to(outputs["mountPath"])


def test_kubelet_expands_variables_as_kubernetes_does():
    env = {"A": "x", "B": "y"}
    assert kubelet.expand("$(A)/$(B)", env) == "x/y"
    assert kubelet.expand("$$(A)", env) == "$(A)"
    assert kubelet.expand("$(C)", env) == "$(C)"


def test_cpu_job_memory_is_what_a_seed_default_run_was_measured_to_need():
    """k8s/job.yaml asks for at most 512Mi: `make bench-memory` measured the
    job completing in less (swap off); the docker test below runs it there."""
    resources = trainer(job_of("job.yaml"))["resources"]
    assert kubelet.memory_bytes(resources["limits"]["memory"]) <= 512 * 2**20
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_kubelet_quantities():
    assert kubelet.cpu_cores("500m") == 0.5
    assert kubelet.cpu_cores("2") == 2
    assert kubelet.memory_bytes("1536Mi") == 1536 * 2**20
    assert kubelet.memory_bytes("1G") == 10**9


def test_kubelet_docker_run_mirrors_the_pod_spec(tmp_path):
    """The docker run line carries every setting the tests rely on."""
    job = job_of("job.yaml")
    pod = kubelet.pod(job, {"mnist-job-outputs": tmp_path}, env={"MNIST_JOB_EPOCHS": "1"})
    args = " ".join(pod.run_args)
    memory = kubelet.memory_bytes(trainer(job)["resources"]["limits"]["memory"])
    for expected in (
        f"--user {CONTAINER_UID}:{CONTAINER_GID}",
        f"--group-add {CONTAINER_GID}",
        "--read-only",
        "--security-opt no-new-privileges",
        "--cap-drop ALL",
        "--cpus 2",
        # The limit, and swap off as a kubelet runs pods: memory+swap == memory.
        f"--memory {memory} --memory-swap {memory} ",
        f"--volume {tmp_path}:/outputs",
        "--tmpfs /tmp:",
        "--network none",
        "--env MNIST_JOB_EPOCHS=1",
    ):
        assert expected in args
    assert pod.run_args[-2:] == [kubelet.image_for("mnist-job:cpu"), "train"]
    assert pod.grace_seconds == kubelet.pod_template(job)["terminationGracePeriodSeconds"]

    multi = job_of("multi-worker.yaml")
    worker = kubelet.pod(multi, {"mnist-job-multi-outputs": tmp_path}, index=1, network="net")
    args = " ".join(worker.run_args)
    assert "--hostname mnist-job-multi-1 " in args
    assert "--network-alias mnist-job-multi-1.mnist-job-multi-workers" in args
    assert "--env JOB_COMPLETION_INDEX=1" in args


# -- as a kubelet would run them (docker) -------------------------------------------


def _assert_artifacts(volume: Path) -> dict:
    missing = [name for name in ARTIFACTS if not (volume / name).exists()]
    assert not missing, f"missing on the volume: {missing}"
    return json.loads((volume / "metrics.json").read_text())


def _assert_resumed_and_finished(volume: Path, logs: list[str], epochs: int) -> None:
    """Every pod resumed from a checkpoint taken after epoch 1, and the run finished."""
    for log in logs:
        resumed = re.search(r"Resuming from \S+: epoch (\d+), step (\d+)", log)
        assert resumed and (int(resumed.group(1)), int(resumed.group(2))) > (1, 0), log[-2000:]
    metrics = _assert_artifacts(volume)
    assert len(metrics["history"]) == epochs
    assert metrics["resumed_from"] is not None


@pytest.fixture(scope="module")
def finished_volume(tmp_path_factory) -> Path:
    """k8s/job.yaml run to completion as its pod, on a fresh volume."""
    require_image("cpu")
    job = job_of("job.yaml")
    volume = kubelet.prepare_volume(tmp_path_factory.mktemp("k8s") / "pvc", job)
    pod = kubelet.pod(job, {"mnist-job-outputs": volume}, env=SMALL_RUN)
    with kubelet.running(pod):
        code = pod.wait(timeout=240)
        assert code == 0, pod.logs()[-3000:]
    return volume


@pytest.mark.docker
def test_job_pod_completes_with_artifacts_on_the_volume(finished_volume):
    metrics = _assert_artifacts(finished_volume)
    assert metrics["config"]["epochs"] == 1
    assert metrics["config"]["output_dir"] == "/outputs"
    assert metrics["test"]["accuracy"] > 0.5
    # Written by the image's user through the fsGroup-owned volume.
    assert (finished_volume / "model.keras").stat().st_uid == CONTAINER_UID
    assert (finished_volume / "model.keras").stat().st_gid == CONTAINER_GID


@pytest.mark.docker
@pytest.mark.parametrize("tag", ["cpu", "cuda"])
def test_manifests_run_as_the_images_user(tag):
    """runAsUser/runAsGroup name the image's own USER: the pod runs as the
    user the image was made for, and runAsNonRoot holds without them too."""
    image = require_image(tag)
    user = subprocess.run(
        [kubelet.DOCKER, "image", "inspect", "--format", "{{.Config.User}}", image],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    checked = []
    for path in MANIFESTS:
        for obj in objects(str(path.relative_to(K8S))):
            if obj["kind"] not in WORKLOADS:
                continue
            spec = kubelet.pod_template(obj)
            if not any(c["image"].endswith(f":{tag}") for c in spec["containers"]):
                continue
            security = spec["securityContext"]
            assert f"{security['runAsUser']}:{security['runAsGroup']}" == user, path.name
            checked.append(path.name)
    assert checked, f"no manifest runs {image}"


@pytest.mark.docker
@pytest.mark.slow
def test_job_pod_completes_a_seed_default_run_within_its_memory_limit(tmp_path):
    """k8s/job.yaml as written (5 epochs, all 60k images) under its memory
    limit with swap off, as a kubelet runs it: completes, not OOM-killed."""
    require_image("cpu")
    job = job_of("job.yaml")
    volume = kubelet.prepare_volume(tmp_path / "pvc", job)
    pod = kubelet.pod(job, {"mnist-job-outputs": volume})
    limit = kubelet.memory_bytes(trainer(job)["resources"]["limits"]["memory"])
    assert f"--memory {limit} --memory-swap {limit} " in " ".join(pod.run_args)
    with kubelet.running(pod):
        code = pod.wait(timeout=300)
        oom_killed = subprocess.run(
            [kubelet.DOCKER, "inspect", "--format", "{{.State.OOMKilled}}", pod.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        log = pod.logs()
    assert (code, oom_killed) == (0, "false"), log[-3000:]
    metrics = _assert_artifacts(volume)
    assert len(metrics["history"]) == 5
    assert metrics["test"]["accuracy"] >= 0.97


@pytest.mark.docker
def test_tensorboard_pod_serves_the_jobs_logs(finished_volume):
    require_image("cpu")
    deployment = kubelet.find(objects("tensorboard.yaml"), "Deployment")
    pod = kubelet.pod(deployment, {"mnist-job-outputs": finished_volume})
    # Probed from inside the pod, on its loopback: no host networking needed.
    probe = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:6006/data/runs', timeout=5)"
        ".read().decode())"
    )
    with kubelet.running(pod):
        deadline = time.monotonic() + 90
        while True:
            result = pod.exec("python3", "-c", probe)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            assert pod.running(), pod.logs()[-3000:]
            time.sleep(0.5)
        assert result.returncode == 0, result.stderr[-2000:] + pod.logs()[-2000:]
        assert set(json.loads(result.stdout)) >= {"train", "validation"}
        # Read-only: the pod cannot touch the job's outputs.
        assert pod.exec("touch", "/outputs/x").returncode != 0


@pytest.mark.docker
def test_fetch_pod_hands_out_the_model_as_kubectl_cp_takes_it(finished_volume, tmp_path):
    """k8s/fetch-outputs.yaml: `kubectl cp pod:/outputs ./outputs` runs
    `tar cf - /outputs` in the pod; the same here gives back the model."""
    require_image("cpu")
    fetch = kubelet.find(objects("fetch-outputs.yaml"), "Pod")
    pod = kubelet.pod(fetch, {"mnist-job-outputs": finished_volume})
    with kubelet.running(pod):
        tar = subprocess.run(
            [kubelet.DOCKER, "exec", pod.name, "tar", "cf", "-", "/outputs"],
            capture_output=True,
            timeout=60,
        )
        assert tar.returncode == 0, tar.stderr.decode()[-2000:]
        assert pod.exec("touch", "/outputs/x").returncode != 0  # read-only
    subprocess.run(["tar", "xf", "-", "-C", str(tmp_path)], input=tar.stdout, check=True)
    copied = tmp_path / "outputs"
    for name in ("model.keras", "metrics.json", "predictions.png"):
        assert (copied / name).read_bytes() == (finished_volume / name).read_bytes()


@pytest.mark.docker
@pytest.mark.slow
def test_preempted_pod_checkpoints_and_its_replacement_resumes(tmp_path):
    """Eviction as a kubelet does it (SIGTERM, SIGKILL after the grace period)
    mid-run; the replacement pod, same spec and volume, resumes and finishes.
    All 60k images, 10 epochs, so that it is still training when stopped."""
    require_image("cpu")
    job = job_of("job.yaml")
    volume = kubelet.prepare_volume(tmp_path / "pvc", job)
    env = {"MNIST_JOB_EPOCHS": "10"}
    first = kubelet.pod(job, {"mnist-job-outputs": volume}, env=env)
    with kubelet.running(first):
        first.wait_for_log(r"epoch 1/10", timeout=180)
        code = first.terminate()
        log = first.logs()
    assert code == ExitCode.TERMINATED, log[-3000:]
    assert "stopped by SIGTERM" in log
    assert (volume / "checkpoints" / "latest.npz").exists()
    assert not (volume / "metrics.json").exists()
    # Evicted pods carry DisruptionTarget; either way no retry is used up.
    assert kubelet.failure_action(job, code) == "Ignore"

    replacement = kubelet.pod(job, {"mnist-job-outputs": volume}, env=env)
    with kubelet.running(replacement):
        code = replacement.wait(timeout=240)
        log = replacement.logs()
    assert code == 0, log[-3000:]
    _assert_resumed_and_finished(volume, [log], epochs=10)


@pytest.mark.docker
@pytest.mark.slow
def test_indexed_job_workers_find_each_other_and_train(tmp_path):
    """k8s/multi-worker.yaml: one container per completion index on a network
    where each is <job>-<i>.<service>; all exit 0, the chief writes."""
    require_image("cpu")
    job = job_of("multi-worker.yaml")
    workers = job["spec"]["completions"]
    volume = kubelet.prepare_volume(tmp_path / "pvc", job)
    with kubelet.docker_network() as network:
        pods = [
            kubelet.pod(
                job, {"mnist-job-multi-outputs": volume}, index=i, env=SMALL_RUN, network=network
            )
            for i in range(workers)
        ]
        with kubelet.running(*pods):
            codes = [p.wait(timeout=300) for p in pods]
            logs = [p.logs() for p in pods]
    assert codes == [0] * workers, "\n\n".join(log[-2000:] for log in logs)
    metrics = _assert_artifacts(volume)
    assert metrics["devices"]["strategy"] == "multi-worker"
    assert metrics["devices"]["workers"] == workers
    assert "Wrote model" in logs[0]
    assert all("Wrote model" not in log for log in logs[1:])
    # Each found the others by the names the headless Service gives them.
    service = job["spec"]["template"]["spec"]["subdomain"]
    assert f"{job['metadata']['name']}-1.{service}:" in logs[0]


@pytest.mark.docker
@pytest.mark.slow
def test_bucket_workers_resume_from_the_bucket_after_one_is_killed(tmp_path):
    """k8s/multi-worker-bucket.yaml: no volume, an S3 API server as the store
    (reached from the pods' network as the cloud's would be, by the endpoint
    variable). A worker killed mid-run; the replacement group resumes from
    the checkpoint in the bucket and the chief uploads every artifact."""
    require_image("cpu")
    job = job_of("multi-worker-bucket.yaml")
    workers = job["spec"]["completions"]
    env = {
        "MNIST_JOB_EPOCHS": "10",
        "MNIST_JOB_MAX_TRAIN_SAMPLES": "4000",
        "MNIST_JOB_CHECKPOINT_EVERY": "25",
        "MNIST_JOB_OUTPUT_DIR": "s3://pods/run",
        **S3_CREDENTIALS,
    }
    with kubelet.docker_network() as network, moto_server(host="0.0.0.0") as url:
        gateway = subprocess.run(
            [kubelet.DOCKER, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}",
             network], capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        env["AWS_ENDPOINT_URL"] = url.replace("127.0.0.1", gateway)
        s3 = boto_s3(url)
        s3.create_bucket(Bucket="pods")
        pods = [kubelet.pod(job, {}, index=i, env=env, network=network) for i in range(workers)]
        with kubelet.running(*pods):
            pods[0].wait_for_log(r"epoch 1/10", timeout=180)
            subprocess.run([kubelet.DOCKER, "kill", pods[-1].name], check=True)
            codes = [p.wait(timeout=120) for p in pods]
        assert codes == [ExitCode.FAILURE, 137]
        assert "Contents" in s3.list_objects_v2(Bucket="pods", Prefix="run/checkpoints/")

        replacements = [
            kubelet.pod(job, {}, index=i, env=env, network=network) for i in range(workers)
        ]
        with kubelet.running(*replacements):
            codes = [p.wait(timeout=300) for p in replacements]
            logs = [p.logs() for p in replacements]
        assert codes == [0] * workers, "\n\n".join(log[-2000:] for log in logs)
        assert all("Resuming from s3://pods/run/checkpoints/latest.npz" in log for log in logs)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="pods")["Contents"]}
        metrics = json.loads(s3.get_object(Bucket="pods", Key="run/metrics.json")["Body"].read())
    missing = [n for n in ARTIFACTS if not any(k.startswith(f"run/{n}") for k in keys)]
    assert not missing, f"missing in the bucket: {missing}"
    assert metrics["devices"]["workers"] == workers and metrics["resumed_from"] is not None
    assert len(metrics["history"]) == 10


def boto_s3(url: str):
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "lost_code", "peer_code", "action"),
    [
        # Preempted: SIGTERM; the workers agree to stop at the same step, the
        # chief checkpoints, all exit 143: no retry is used up.
        ("terminate", ExitCode.TERMINATED, ExitCode.TERMINATED, "Ignore"),
        # Crashed (SIGKILL, like the OOM killer): the peer's collectives abort.
        ("kill", 137, ExitCode.FAILURE, "Count"),
    ],
)
def test_lost_worker_restarts_the_group_from_the_checkpoint(
    tmp_path, how, lost_code, peer_code, action
):
    """One worker of k8s/multi-worker.yaml lost mid-run: the other one ends
    too, with the exit code the podFailurePolicy expects; the replacement
    pods (the Job controller replaces every index) resume and finish."""
    require_image("cpu")
    job = job_of("multi-worker.yaml")
    workers = job["spec"]["completions"]
    volume = kubelet.prepare_volume(tmp_path / "pvc", job)
    # Lost after epoch 1 of 10 (~0.5 s each here), so surely mid-run;
    # checkpoints every 25 of the 125 steps of an epoch.
    env = {
        "MNIST_JOB_EPOCHS": "10",
        "MNIST_JOB_MAX_TRAIN_SAMPLES": "4000",
        "MNIST_JOB_CHECKPOINT_EVERY": "25",
    }
    claims = {"mnist-job-multi-outputs": volume}
    with kubelet.docker_network() as network:
        pods = [kubelet.pod(job, claims, index=i, env=env, network=network) for i in range(workers)]
        with kubelet.running(*pods):
            pods[0].wait_for_log(r"epoch 1/10", timeout=180)
            lost = pods[-1]
            if how == "terminate":
                codes = {lost.name: lost.terminate()}
            else:
                subprocess.run([kubelet.DOCKER, "kill", lost.name], check=True)
                codes = {lost.name: lost.wait(timeout=30)}
            codes.update({p.name: p.wait(timeout=120) for p in pods[:-1]})
            logs = "\n\n".join(p.logs()[-1500:] for p in pods)
        assert codes[lost.name] == lost_code, logs
        assert [codes[p.name] for p in pods[:-1]] == [peer_code] * (workers - 1), logs
        for code in codes.values():
            assert kubelet.failure_action(job, code, container="mnist-job") == action
        assert (volume / "checkpoints" / "latest.npz").exists()
        assert not (volume / "metrics.json").exists()

        replacements = [
            kubelet.pod(job, claims, index=i, env=env, network=network) for i in range(workers)
        ]
        with kubelet.running(*replacements):
            codes = [p.wait(timeout=300) for p in replacements]
            logs = [p.logs() for p in replacements]
    assert codes == [0] * workers, "\n\n".join(log[-2000:] for log in logs)
    _assert_resumed_and_finished(volume, logs, epochs=10)


@pytest.mark.docker
def test_gpu_job_on_a_node_without_gpu_fails_the_job(tmp_path):
    """The CUDA image where TensorFlow sees no GPU: exit 4 at once, and the
    podFailurePolicy fails the Job rather than retrying or training on CPU."""
    require_image("cuda")
    job = job_of("job-gpu.yaml")
    volume = kubelet.prepare_volume(tmp_path / "pvc", job)
    pod = kubelet.pod(job, {"mnist-job-gpu-outputs": volume}, env=SMALL_RUN)
    with kubelet.running(pod):
        code = pod.wait(timeout=180)
        log = pod.logs()
    assert code == ExitCode.DEVICE, log[-3000:]
    assert "no GPU is visible" in log
    assert kubelet.failure_action(job, code) == "FailJob"
    assert not (volume / "checkpoints").exists()


# -- JobSet and Kubeflow Trainer pods, as their controllers and a kubelet would ------


def _gateway(network: str) -> str:
    """The host's address on a docker network: where a pod reaches the host."""
    return subprocess.run(
        [kubelet.DOCKER, "network", "inspect", "--format",
         "{{(index .IPAM.Config 0).Gateway}}", network],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _run_group(pods: list, timeout: float = 300) -> tuple[list[int], list[str]]:
    with kubelet.running(*pods):
        codes = [p.wait(timeout=timeout) for p in pods]
        logs = [p.logs() for p in pods]
    return codes, logs


@pytest.mark.docker
@pytest.mark.slow
def test_jobset_workers_find_each_other_train_and_restart_as_a_group(tmp_path):
    """k8s/jobset.yaml's 2 worker pods, named, labelled and resolvable as
    JobSet makes them: they train together and the chief writes. Then a
    worker killed mid-run: JobSet recreates the whole group, which resumes
    from the checkpoint and finishes."""
    require_image("cpu")
    jobset = kubelet.find(objects("jobset.yaml"), "JobSet")
    spec = kubelet.replicated_jobs(jobset)[0]["template"]["spec"]
    workers = spec["parallelism"]
    claims = {"mnist-jobset-outputs": kubelet.prepare_volume(tmp_path / "pvc", jobset)}
    with kubelet.docker_network() as network:
        pods = [
            kubelet.jobset_pod(jobset, claims, 0, i, env=SMALL_RUN, network=network)
            for i in range(workers)
        ]
        codes, logs = _run_group(pods)
    assert codes == [0] * workers, "\n\n".join(log[-2000:] for log in logs)
    metrics = _assert_artifacts(claims["mnist-jobset-outputs"])
    assert (metrics["devices"]["strategy"], metrics["devices"]["workers"]) == ("multi-worker", 2)
    assert "Multi-worker cluster from jobset" in logs[0]
    assert "mnist-jobset-workers-0-1.mnist-jobset:2222" in logs[0]
    assert "Wrote model" in logs[0] and "Wrote model" not in logs[1]

    # A worker lost mid-run (SIGKILL, as the OOM killer): the group restarts.
    claims = {"mnist-jobset-outputs": kubelet.prepare_volume(tmp_path / "pvc2", jobset)}
    env = {
        "MNIST_JOB_EPOCHS": "10",
        "MNIST_JOB_MAX_TRAIN_SAMPLES": "4000",
        "MNIST_JOB_CHECKPOINT_EVERY": "25",
    }
    with kubelet.docker_network() as network:
        pods = [kubelet.jobset_pod(jobset, claims, 0, i, env=env, network=network) for i in (0, 1)]
        with kubelet.running(*pods):
            pods[0].wait_for_log(r"epoch 1/10", timeout=180)
            subprocess.run([kubelet.DOCKER, "kill", pods[1].name], check=True)
            codes = [pods[1].wait(timeout=30), pods[0].wait(timeout=120)]
        assert codes == [137, ExitCode.FAILURE]
        actions = {kubelet.jobset_action(jobset, c, container="mnist-job") for c in codes}
        assert actions == {"RestartJobSet"}  # the whole group, one restart used
        assert (claims["mnist-jobset-outputs"] / "checkpoints" / "latest.npz").exists()
        group = [kubelet.jobset_pod(jobset, claims, 0, i, env=env, network=network) for i in (0, 1)]
        codes, logs = _run_group(group)
    assert codes == [0, 0], "\n\n".join(log[-2000:] for log in logs)
    _assert_resumed_and_finished(claims["mnist-jobset-outputs"], logs, epochs=10)


@pytest.mark.docker
@pytest.mark.slow
def test_trainjob_nodes_train_and_the_chief_reports_progress(tmp_path):
    """k8s/trainer/trainjob.yaml on k8s/trainer/runtime.yaml, merged as
    Trainer merges them (JAX policy variables, TrainJob env, TrainJobStatus
    variables and token volume): 2 node pods train, the chief writes under
    /outputs/<trainjob>, and its progress reports reach a local HTTPS server
    (own CA) with the pod's token."""
    require_image("cpu")
    runtime = kubelet.find(objects("trainer/runtime.yaml"), "ClusterTrainingRuntime")
    trainjob = kubelet.find(objects("trainer/trainjob.yaml"), "TrainJob")
    name = trainjob["metadata"]["name"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    with kubelet.docker_network() as network:
        server, stop = status_server.serve(secrets, host="0.0.0.0", hosts=(_gateway(network),))
        try:
            for path in (secrets / "ca.crt", secrets / "token"):
                path.chmod(0o644)
            token_dir = tmp_path / "token"
            token_dir.mkdir()
            for path in ("ca.crt", "token"):
                (token_dir / path).write_bytes((secrets / path).read_bytes())
                (token_dir / path).chmod(0o644)
            jobset = kubelet.trainjob_jobset(runtime, trainjob, status_url=server.url)
            assert jobset["metadata"]["name"] == name
            claims = {
                "mnist-trainjob-outputs": kubelet.prepare_volume(tmp_path / "pvc", jobset),
                "kubeflow-trainer-token": token_dir,
            }
            nodes = trainjob["spec"]["trainer"]["numNodes"]
            env = {**SMALL_RUN, "MNIST_JOB_EPOCHS": "2"}
            pods = [
                kubelet.jobset_pod(jobset, claims, 0, i, env=env, network=network)
                for i in range(nodes)
            ]
            assert " --hostname mnist-train-node-0-1 " in " ".join(pods[1].run_args)
            codes, logs = _run_group(pods)
        finally:
            stop()
    assert codes == [0] * nodes, "\n\n".join(log[-2000:] for log in logs)
    metrics = _assert_artifacts(claims["mnist-trainjob-outputs"] / name)
    assert (metrics["devices"]["strategy"], metrics["devices"]["workers"]) == ("multi-worker", 2)
    assert "Multi-worker cluster from kubeflow-trainer" in logs[0]
    assert f"{name}-node-0-1.{name}:29500" in logs[0]
    # The chief alone reported: after epoch 1 and after the last (2 of 2).
    assert [r["path"] for r in server.requests] == [status_server.PATH] * 2, logs[0][-3000:]
    assert {r["headers"]["Authorization"] for r in server.requests} == {
        f"Bearer {status_server.TOKEN}"
    }
    reports = [b["trainerStatus"] for b in server.bodies()]
    assert [r["progressPercentage"] for r in reports] == [50, 100]
    assert reports[-1]["estimatedRemainingSeconds"] == 0
    assert [m["name"] for m in reports[0]["metrics"]] == [
        "loss", "accuracy", "val_loss", "val_accuracy"
    ]  # fmt: skip
    assert all("progress report" not in log for log in logs)
