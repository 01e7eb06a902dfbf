"""Run a Kubernetes workload's pod template with docker, as a kubelet would.

No cluster runs on our machines, so the tests check what a kubelet would do
with `k8s/*.yaml` by doing the same with docker: the container's image,
command/args and env (with `$(VAR)` expansion and what Kubernetes injects:
the pod hostname, JOB_COMPLETION_INDEX of an Indexed Job), the user and groups
of the securityContext (fsGroup as a supplementary group owning the volumes),
a read-only root filesystem, no new privileges, dropped capabilities, the CPU
and memory limits (the memory limit with swap off, as a kubelet runs pods),
`emptyDir` volumes as tmpfs mounts (what they hold counts against the memory
limit here, as it would with `medium: Memory`), each PersistentVolumeClaim
as a host directory and each `configMap` volume as one holding its keys
(`config_map_dir`), read-only. Pods of an Indexed Job with a
`subdomain` join a user-defined docker network under the DNS name
`<hostname>.<subdomain>`, as a headless Service names them.

`failure_action` applies a Job's podFailurePolicy to a pod's exit code as the
Job controller would, so tests can say what the cluster would do next;
`jobset_action` does the same for a JobSet's failurePolicy on its child Job's
failure. `jobset_pod` makes a JobSet's pod as the JobSet controller would
(name, hostname, subdomain, labels read through the downward API), and
`trainjob_jobset` the JobSet Kubeflow Trainer makes from a TrainJob and its
runtime (env merged by name, the JAX policy's variables, the progress
server's variables and token volume).

Not emulated: scheduling, probes, image pulls, Services other than the
headless DNS names, resource requests (only limits constrain a container).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

DOCKER = os.environ.get("DOCKER", "docker")
TEST_LABEL = "mnist-job.test=kubelet"  # on every container and network made here


def load(path: Path) -> list[dict]:
    """The objects of a manifest file, in order."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    if len(matches) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(matches)}")
    return matches[0]


def pod_template(workload: dict) -> dict:
    """The pod spec of a Job or Deployment, of a Pod itself, or of the first
    replicated Job of a JobSet or a Kubeflow (Cluster)TrainingRuntime."""
    if workload["kind"] == "Pod":
        return workload["spec"]
    if workload["kind"] in REPLICATED:
        return replicated_jobs(workload)[0]["template"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


REPLICATED = ("JobSet", "ClusterTrainingRuntime", "TrainingRuntime")


def replicated_jobs(workload: dict) -> list[dict]:
    """The replicatedJobs of a JobSet, or of the JobSet a runtime describes."""
    spec = workload["spec"]
    if workload["kind"] != "JobSet":
        spec = spec["template"]["spec"]
    return spec["replicatedJobs"]


def image_for(image: str) -> str:
    """The manifest's image, its repository swapped for $IMAGE if set (as
    `make docker-test IMAGE=...` does), so tests run the images make built."""
    repository, _, tag = image.rpartition(":")
    override = os.environ.get("IMAGE")
    return f"{override or repository}:{tag}"


# -- quantities -------------------------------------------------------------------

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cpu_cores(quantity: str | int | float) -> float:
    """'2' -> 2.0, '500m' -> 0.5."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> int:
    """'1536Mi' -> 1610612736, '1G' -> 10**9."""
    text = str(quantity)
    for suffixes in (_BINARY, _DECIMAL):
        for suffix, factor in suffixes.items():
            if text.endswith(suffix):
                return int(float(text[: -len(suffix)]) * factor)
    return int(text)


# -- the Job controller's podFailurePolicy ------------------------------------------


def failure_action(
    job: dict, exit_code: int, conditions: tuple[str, ...] = (), container: str | None = None
) -> str | None:
    """What the Job controller does with a pod that ended with `exit_code`.

    None for success; else the first matching rule's action (FailJob, Ignore,
    FailIndex, Count), or "Count" (counts against backoffLimit) if none
    matches. `conditions`: pod conditions that are True (e.g. DisruptionTarget).
    """
    if exit_code == 0:
        return None
    rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
    for rule in rules:
        on_codes = rule.get("onExitCodes")
        if on_codes:
            named = on_codes.get("containerName")
            if named and container and named != container:
                continue
            hit = exit_code in on_codes["values"]
            if hit == (on_codes["operator"] == "In"):
                return rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] in conditions and condition.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def jobset_action(
    workload: dict, exit_code: int, conditions: tuple[str, ...] = (), container: str | None = None
) -> str | None:
    """What JobSet does when a pod of its first replicated Job ends with
    `exit_code`: the child Job's podFailurePolicy decides whether (and with
    which reason and message) the Job fails, then the JobSet's failurePolicy
    rules match that reason and message, as the two controllers do. None
    for success; "Ignore" or "Count" when the Job itself retries the pod; else
    the JobSet's action (default RestartJobSet). Works for a runtime's too."""
    if exit_code == 0:
        return None
    job_spec = replicated_jobs(workload)[0]["template"]["spec"]
    reason = message = None
    for index, rule in enumerate(job_spec.get("podFailurePolicy", {}).get("rules", [])):
        on_codes = rule.get("onExitCodes")
        if on_codes and (exit_code in on_codes["values"]) == (on_codes["operator"] == "In"):
            message = (
                f"Container {on_codes.get('containerName', container)} for pod ns/pod failed "
                f"with exit code {exit_code} matching {rule['action']} rule at index {index}"
            )
        for condition in rule.get("onPodConditions", []):
            if condition["type"] in conditions and message is None:
                message = (
                    f"Pod ns/pod has condition {condition['type']} matching "
                    f"{rule['action']} rule at index {index}"
                )
        if message:
            if rule["action"] != "FailJob":
                return rule["action"]
            reason = "PodFailurePolicy"
            break
    if reason is None:
        if job_spec.get("backoffLimit", 6) > 0:
            return "Count"
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    spec = (
        workload["spec"] if workload["kind"] == "JobSet" else workload["spec"]["template"]["spec"]
    )
    for rule in spec.get("failurePolicy", {}).get("rules", []):
        reasons = rule.get("onJobFailureReasons", [])
        patterns = rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or reason in reasons) and (
            not patterns or any(re.search(pattern, message) for pattern in patterns)
        ):
            return rule["action"]
    return "RestartJobSet"


# -- pods as containers ---------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` escapes,
    unknown references stay as they are."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


@dataclass
class Pod:
    """One pod of a workload, as a docker container."""

    name: str
    run_args: list[str]  # `docker run` arguments, image and command included
    grace_seconds: int = 30

    def start(self) -> Pod:
        _docker("run", "--detach", *self.run_args)
        return self

    def logs(self) -> str:
        result = subprocess.run(
            [DOCKER, "logs", self.name], capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr

    def running(self) -> bool:
        return _docker("inspect", "--format", "{{.State.Running}}", self.name).strip() == "true"

    def wait(self, timeout: float) -> int:
        """Wait for the container to exit; its exit code."""
        try:
            out = subprocess.run(
                [DOCKER, "wait", self.name],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            ).stdout
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"pod {self.name} still running after {timeout} s; log:\n{self.logs()[-3000:]}"
            ) from None
        return int(out.strip().splitlines()[-1])

    def wait_for_log(self, pattern: str, timeout: float) -> str:
        """Poll the log until `pattern` (a regex) appears; the matching text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.logs())
            if found:
                return found.group(0)
            if not self.running():
                break
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in the log of {self.name}:\n{self.logs()[-3000:]}")

    def terminate(self) -> int:
        """What a pod deletion or eviction does: SIGTERM, SIGKILL after the
        pod's terminationGracePeriodSeconds. Returns the exit code."""
        _docker("stop", "--time", str(self.grace_seconds), self.name)
        return self.wait(timeout=30)

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [DOCKER, "exec", self.name, *command], capture_output=True, text=True, check=False
        )

    def remove(self) -> None:
        subprocess.run([DOCKER, "rm", "--force", self.name], capture_output=True, check=False)


def pod(
    workload: dict,
    claims: Mapping[str, Path],
    *,
    index: int | None = None,
    env: Mapping[str, str] | None = None,
    network: str | None = None,
    container: str | None = None,
    metadata: Mapping | None = None,
) -> Pod:
    """The `docker run` of one pod of `workload` (Job, Deployment or Pod).

    claims: claimName -> host directory standing in for the volume (prepared
    with `prepare_volume`). index: the completion index, for Indexed Jobs.
    env: variables to set or override after the manifest's (tests use it to
    shrink the run). network: a docker network; None runs with no network.
    metadata: the pod's labels and annotations, for the downward API (a
    JobSet's pods: `jobset_pod`); an Indexed Job's pod also gets its
    completion-index annotation. Projected volumes are host directories in
    `claims` under the volume's name, mounted read-only.
    """
    spec = pod_template(workload)
    containers = spec["containers"]
    c = next(c for c in containers if container in (None, c["name"]))
    workload_name = workload["metadata"]["name"]
    suffix = secrets.token_hex(3)
    indexed = workload["spec"].get("completionMode") == "Indexed"
    if indexed:
        if index is None:
            raise ValueError("an Indexed Job's pod needs its completion index")
        hostname = f"{workload_name}-{index}"
    elif workload["kind"] == "Pod":
        hostname = workload_name
    else:
        hostname = f"{workload_name}-{suffix[:5]}"
    name = f"{hostname}-{suffix}"

    args = ["--name", name, "--hostname", hostname, "--label", TEST_LABEL]

    # Environment: what Kubernetes injects, then the container's, in order,
    # each value able to refer to the ones before it.
    environ: dict[str, str] = {}
    fields = {f"metadata.labels['{k}']": v for k, v in (metadata or {}).get("labels", {}).items()}
    annotations = dict((metadata or {}).get("annotations", {}))
    if indexed:
        environ["JOB_COMPLETION_INDEX"] = str(index)
        annotations["batch.kubernetes.io/job-completion-index"] = str(index)
    fields.update({f"metadata.annotations['{k}']": v for k, v in annotations.items()})
    fields["metadata.name"] = name
    for var in c.get("env", []):
        if "value" in var:
            environ[var["name"]] = expand(str(var["value"]), environ)
            continue
        path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if path not in fields:
            raise NotImplementedError(f"env {var['name']}: {var.get('valueFrom')} not emulated")
        environ[var["name"]] = fields[path]
    environ.update(env or {})
    for key, value in environ.items():
        args += ["--env", f"{key}={value}"]

    # Security context: the container's settings override the pod's.
    pod_security = spec.get("securityContext", {})
    security = {**pod_security, **c.get("securityContext", {})}
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    if security.get("runAsNonRoot") and uid in (None, 0):
        # The kubelet checks the image's user when runAsUser is unset; we
        # only accept manifests that name the user.
        raise ValueError("runAsNonRoot needs a non-zero runAsUser here")
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else 0}"]
    fs_group = pod_security.get("fsGroup")
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]
    for group in pod_security.get("supplementalGroups", []):
        args += ["--group-add", str(group)]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    capabilities = security.get("capabilities", {})
    for cap in capabilities.get("drop", []):
        args += ["--cap-drop", cap]
    for cap in capabilities.get("add", []):
        args += ["--cap-add", cap]
    seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise NotImplementedError(f"seccompProfile {seccomp}")

    # Limits (requests only matter to the scheduler).
    limits = c.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        args += ["--cpus", f"{cpu_cores(limits['cpu']):g}"]
    if "memory" in limits:
        # A kubelet runs containers without swap: memory+swap == memory. Docker
        # alone would allow as much swap again on a host that has some.
        memory = str(memory_bytes(limits["memory"]))
        args += ["--memory", memory, "--memory-swap", memory]
    if "nvidia.com/gpu" in limits and os.environ.get("KUBELET_GPUS"):
        # Only where the host has GPUs and says so: on a node without them the
        # pod would not be scheduled, and the tests check what the job does
        # when it lands somewhere TensorFlow sees no GPU.
        args += ["--gpus", str(limits["nvidia.com/gpu"])]

    # Volumes.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            options = "rw,exec,mode=1777" + (f",size={memory_bytes(size)}" if size else "")
            args += ["--tmpfs", f"{target}:{options}"]
        elif "projected" in volume:
            args += ["--volume", f"{claims[mount['name']]}:{target}:ro"]
        elif "configMap" in volume:  # a host dir made by config_map_dir
            args += ["--volume", f"{claims[volume['configMap']['name']]}:{target}:ro"]
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            source = Path(claims[claim["claimName"]])
            if mount.get("subPath"):
                source = source / mount["subPath"]
            read_only = mount.get("readOnly") or claim.get("readOnly")
            args += ["--volume", f"{source}:{target}{':ro' if read_only else ''}"]
        else:
            raise NotImplementedError(f"volume {mount['name']}: {sorted(volume)}")

    # Network: a pod of a workload with a subdomain (headless Service) is
    # found as <hostname>.<subdomain>.
    if network:
        args += ["--network", network]
        if spec.get("subdomain"):
            args += ["--network-alias", f"{hostname}.{spec['subdomain']}"]
    else:
        args += ["--network", "none"]

    # command replaces the image's ENTRYPOINT, args its CMD.
    command = [expand(part, environ) for part in c.get("command", [])]
    arguments = [expand(part, environ) for part in c.get("args", [])]
    if command:
        args += ["--entrypoint", command[0]]
    args.append(image_for(c["image"]))
    if command:
        args += command[1:] + arguments
    else:
        args += arguments

    return Pod(
        name=name, run_args=args, grace_seconds=int(spec.get("terminationGracePeriodSeconds", 30))
    )


def prepare_volume(path: Path, workload: dict) -> Path:
    """A host directory as a fresh volume looks to the pod: with an fsGroup,
    root-owned but group-owned by the fsGroup, group-writable and setgid, as
    the kubelet makes it; so the pod writes there only through its group."""
    path.mkdir(parents=True, exist_ok=True)
    fs_group = pod_template(workload).get("securityContext", {}).get("fsGroup")
    try:
        if fs_group is None:
            raise PermissionError
        os.chown(path, 0, fs_group)
        path.chmod(0o2775)
    except PermissionError:
        path.chmod(0o777)  # not root, or no fsGroup: let any user write
    return path


def config_map_dir(path: Path, config_map: dict) -> Path:
    """A host directory holding a ConfigMap's keys as files, as the kubelet
    mounts a configMap volume (read-only; files readable by any user)."""
    path.mkdir(parents=True, exist_ok=True)
    for key, value in config_map.get("data", {}).items():
        (path / key).write_text(value)
        (path / key).chmod(0o644)
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def docker_network() -> Iterator[str]:
    """A user-defined network: docker's DNS resolves the pods' aliases on it."""
    name = f"mnist-job-test-{secrets.token_hex(4)}"
    _docker("network", "create", "--label", TEST_LABEL, name)
    try:
        yield name
    finally:
        subprocess.run([DOCKER, "network", "rm", name], capture_output=True, check=False)


@contextlib.contextmanager
def running(*pods: Pod) -> Iterator[tuple[Pod, ...]]:
    """Start the pods; remove their containers afterwards, whatever happened."""
    try:
        for p in pods:
            p.start()
        yield pods
    finally:
        for p in pods:
            p.remove()


def _docker(*args: str) -> str:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])}...: {result.stderr.strip()}")
    return result.stdout


# -- JobSet and Kubeflow Trainer, as their controllers make pods ------------------


def jobset_pod(
    jobset: dict,
    claims: Mapping[str, Path],
    job_index: int,
    pod_index: int,
    *,
    env: Mapping[str, str] | None = None,
    network: str | None = None,
) -> Pod:
    """Pod `pod_index` of Job `job_index` of a JobSet's first replicated Job:
    the child Job JobSet makes (`<jobset>-<rjob>-<j>`, Indexed, the subdomain
    set when enableDNSHostnames), with the labels and annotations JobSet puts
    on its pods, as `pod` runs it."""
    name = jobset["metadata"]["name"]
    replicated = replicated_jobs(jobset)[0]
    job = {
        "kind": "Job",
        "metadata": {"name": f"{name}-{replicated['name']}-{job_index}"},
        "spec": copy.deepcopy(replicated["template"]["spec"]),
    }
    job["spec"]["completionMode"] = "Indexed"  # JobSet's default
    network_spec = jobset["spec"].get("network", {})
    if network_spec.get("enableDNSHostnames", True):
        job["spec"]["template"]["spec"]["subdomain"] = network_spec.get("subdomain", name)
    template_labels = job["spec"]["template"].get("metadata", {}).get("labels", {})
    jobset_labels = {
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
        "jobset.sigs.k8s.io/replicatedjob-replicas": str(replicated.get("replicas", 1)),
        "jobset.sigs.k8s.io/job-index": str(job_index),
        "jobset.sigs.k8s.io/restart-attempt": "0",
    }
    metadata = {"labels": {**template_labels, **jobset_labels}, "annotations": jobset_labels}
    return pod(job, claims, index=pod_index, env=env, network=network, metadata=metadata)


def upsert_env(env: list[dict], *variables: dict) -> None:
    """Trainer's apply.UpsertEnvVars: replace by name in place, else append."""
    for var in variables:
        names = [v["name"] for v in env]
        if var["name"] in names:
            env[names.index(var["name"])] = var
        else:
            env.append(var)


def trainjob_jobset(runtime: dict, trainjob: dict, status_url: str | None = None) -> dict:
    """The JobSet Kubeflow Trainer v2 makes from a TrainJob on a runtime (its
    jobset, JAX, plainml and TrainJobStatus plugins, main after v2.3.0): named
    after the TrainJob; the `node` Job's pods numNodes; the TrainJob's image,
    command and args replacing the runtime's, its resourcesPerNode merged over
    the runtime's resource by resource, its env merged by name; the JAX
    policy's variables and port 29500; with status_url, the TrainJobStatus
    variables and the token volume (claims name it `kubeflow-trainer-token`)."""
    name = trainjob["metadata"]["name"]
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    policy = runtime["spec"].get("mlPolicy", {})
    settings = trainjob["spec"].get("trainer", {})
    nodes = settings.get("numNodes", policy.get("numNodes", 1))
    (node,) = [r for r in spec["replicatedJobs"] if r["name"] == "node"]
    node["replicas"] = 1
    node["template"]["spec"]["parallelism"] = node["template"]["spec"]["completions"] = nodes
    pod_spec = node["template"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "node"]
    for key in ("image", "command", "args"):
        if key in settings:
            container[key] = settings[key]
    for kind, quantities in settings.get("resourcesPerNode", {}).items():
        container.setdefault("resources", {}).setdefault(kind, {}).update(quantities)
    env = container.setdefault("env", [])
    if "jax" in policy:
        index_path = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        upsert_env(
            env,
            {"name": "JAX_NUM_PROCESSES", "value": str(nodes)},
            {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": index_path}}},
            {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-node-0-0.{name}:29500"},
        )
        if 29500 not in [p["containerPort"] for p in container.get("ports", [])]:
            container.setdefault("ports", []).append({"containerPort": 29500})
    upsert_env(env, *settings.get("env", []))
    if status_url:
        mount = "/var/run/secrets/kubeflow/trainer"
        upsert_env(
            env,
            {"name": "KUBEFLOW_TRAINER_SERVER_URL", "value": status_url},
            {"name": "KUBEFLOW_TRAINER_SERVER_CA_CERT", "value": f"{mount}/ca.crt"},
            {"name": "KUBEFLOW_TRAINER_SERVER_TOKEN", "value": f"{mount}/token"},
        )
        container.setdefault("volumeMounts", []).append(
            {"name": "kubeflow-trainer-token", "mountPath": mount, "readOnly": True}
        )
        pod_spec.setdefault("volumes", []).append(
            {"name": "kubeflow-trainer-token", "projected": {"sources": []}}
        )
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip
