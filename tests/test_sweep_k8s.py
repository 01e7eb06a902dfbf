"""k8s/sweep.yaml: an Indexed Job with one completion per trial of its
ConfigMap's spec, failure rules that fail one trial and not the sweep, and
pods that, run as a kubelet would (tests/kubelet.py), each train their own
trial on the shared volume. The schemas, lint, security and network policy
checks of every manifest (tests/test_k8s.py) cover it too."""

from __future__ import annotations

import json
import os
import subprocess

import click
import pytest

from job import sweep
from job.cli import train
from job.errors import ExitCode
from job.sweep_cli import trial as trial_command
from tests import kubelet
from tests.docker_helpers import require_image
from tests.test_k8s import SMALL_RUN, env_of, objects, trainer

NAME = "sweep.yaml"


def parts():
    docs = objects(NAME)
    return kubelet.find(docs, "ConfigMap"), kubelet.find(docs, "Job")


def spec_of(config_map: dict) -> sweep.Sweep:
    ((key, text),) = config_map["data"].items()
    return sweep.parse(json.loads(text), where=f"ConfigMap {key}")


def test_one_completion_per_trial_of_the_configmaps_spec():
    config_map, job = parts()
    spec = spec_of(config_map)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == len(spec.trials)
    assert 1 <= job["spec"]["parallelism"] <= len(spec.trials)
    assert spec.varied  # it sweeps something


def test_pods_run_sweep_trial_on_the_mounted_spec_into_the_volume(monkeypatch):
    config_map, job = parts()
    container = trainer(job)
    pod = kubelet.pod_template(job)
    args = container["args"]
    assert "command" not in container, "the image's entrypoint, mnist-job"
    assert args[:2] == ["sweep", "trial"]
    for var in list(os.environ):
        if var.startswith("MNIST_JOB_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")  # what Kubernetes sets
    params = trial_command.make_context("trial", list(args[2:])).params
    assert params["index"] == 0, "the index comes from the pod's JOB_COMPLETION_INDEX"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    spec_dir, _, key = str(params["spec"]).rpartition("/")
    assert volumes[mounts[spec_dir]["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert key in config_map["data"] and mounts[spec_dir]["readOnly"] is True
    output = volumes[mounts[str(params["output_dir"])]["name"]]
    claim = kubelet.find(objects(NAME), "PersistentVolumeClaim")
    assert output["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes
    # Its MNIST_JOB_* variables are options of train, valid for every trial.
    known = {param.opts[0][2:].upper().replace("-", "_") for param in train.params
             if isinstance(param, click.Option)}  # fmt: skip
    env = env_of(container)
    assert {var.removeprefix("MNIST_JOB_") for var in env} <= known
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for settings in spec_of(config_map).trials:
        config = sweep.train_config(settings, "/outputs/trial")
        assert config.epochs == int(env["MNIST_JOB_EPOCHS"])


def test_a_failed_trial_fails_its_index_not_the_sweep():
    _, job = parts()
    spec = job["spec"]
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec.get("maxFailedIndexes", spec["completions"]) >= spec["completions"] - 1
    assert spec["podReplacementPolicy"] == "Failed"
    expected = {
        ExitCode.USAGE: "FailIndex",  # refused or diverged: the others go on
        ExitCode.DATA: "FailJob",  # every trial would fail alike
        ExitCode.DEVICE: "FailJob",
        ExitCode.TERMINATED: "Ignore",  # checkpointed; the next pod resumes
        ExitCode.FAILURE: "Count",  # retried, up to backoffLimitPerIndex
        137: "Count",
    }
    for code, action in expected.items():
        assert kubelet.failure_action(job, int(code), container="mnist-job") == action, code
    for code in (1, 137, 143):  # preempted, evicted: whatever it exited with
        assert kubelet.failure_action(job, code, ("DisruptionTarget",)) == "Ignore"


@pytest.mark.docker
@pytest.mark.slow
def test_two_indexes_train_their_trials_and_a_third_fails_alone(tmp_path):
    """Pods 0 and 1 as the Job controller and a kubelet make them, on one
    volume: each trains its own trial and prints only its metrics on stdout.
    Pod 2, given too few images for its batch, exits 2: FailIndex."""
    require_image("cpu")
    config_map, job = parts()
    claims = {
        "mnist-sweep-outputs": kubelet.prepare_volume(tmp_path / "pvc", job),
        config_map["metadata"]["name"]: kubelet.config_map_dir(tmp_path / "spec", config_map),
    }
    spec = spec_of(config_map)
    failing = {**SMALL_RUN, "MNIST_JOB_MAX_TRAIN_SAMPLES": "16"}  # < every batch size
    pods = [kubelet.pod(job, claims, index=i, env=SMALL_RUN) for i in (0, 1)]
    pods.append(kubelet.pod(job, claims, index=2, env=failing))
    with kubelet.running(*pods):
        codes = [p.wait(timeout=300) for p in pods]
        logs = [p.logs() for p in pods]
        stdouts = [
            subprocess.run([kubelet.DOCKER, "logs", p.name], capture_output=True, text=True).stdout
            for p in pods
        ]
    assert codes == [0, 0, ExitCode.USAGE], "\n\n".join(log[-2000:] for log in logs)
    assert kubelet.failure_action(job, codes[2], container="mnist-job") == "FailIndex"
    volume = claims["mnist-sweep-outputs"]
    for index in (0, 1):
        metrics = json.loads((volume / f"trial-{index}" / "metrics.json").read_text())
        assert metrics["config"]["learning_rate"] == spec.trials[index]["learning-rate"]
        assert stdouts[index].splitlines() == [
            f"test_accuracy={metrics['test']['accuracy']:.6g}",
            f"test_loss={metrics['test']['loss']:.6g}",
        ]
    failed = json.loads((volume / "trial-2" / "failed.json").read_text())
    assert failed["exit_code"] == 2 and "training images" in failed["error"]
    assert json.loads((volume / "sweep.json").read_text())["trials"] == spec.to_dict()["trials"]
