"""Running the job's images from tests: engine and image checks that skip with a
reason, volumes the container user can write, `docker run` with the flags a
locked-down runtime uses.

The images are built by `make docker` (CI runs it before the tests); tests
never build them. `IMAGE=name make docker-test` tests images named otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

IMAGE = os.environ.get("IMAGE", "mnist-job")
# The image's USER (docker/Dockerfile): non-root, >= 10000 as Kubernetes
# policies ask; k8s/*.yaml's runAsUser, runAsGroup and fsGroup name the same.
CONTAINER_UID = 10001
CONTAINER_GID = 10001
ARTIFACTS = (
    "model.keras",
    "saved_model/saved_model.pb",
    "tensorboard",
    "predictions.png",
    "metrics.json",
)


@functools.cache
def engine_problem() -> str | None:
    """Why no Docker engine can be used, or None if one answers."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (scripts/install-docker.sh installs the engine)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return f"`docker info` failed: {info.stderr.strip().splitlines()[-1:]}"
    return None


def require_engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(f"needs a Docker engine: {problem}")


def require_image(tag: str) -> str:
    """The image `IMAGE:tag`, or skip the test if the engine or the image is missing."""
    require_engine()
    image = f"{IMAGE}:{tag}"
    found = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60)
    if found.returncode != 0:
        pytest.skip(f"image {image} is not built: run `make docker` first")
    return image


def writable_volume(path: Path, uid: int = CONTAINER_UID, gid: int = CONTAINER_GID) -> Path:
    """A host directory that the container user can write, as an empty volume."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chown(path, uid, gid)
    except PermissionError:  # not root: let anyone write instead
        path.chmod(0o777)
    return path


def docker_run_args(
    image: str,
    *args: str,
    volumes: dict[Path, str] | None = None,
    user: str | None = None,
    env: dict[str, str] | None = None,
    name: str | None = None,
    detach: bool = False,
    network: str = "none",
) -> list[str]:
    """`docker run` as a locked-down runtime runs the job: read-only root, /tmp
    as a tmpfs, no network (unless `network` names one: "host" reaches the
    tests' servers on 127.0.0.1), no privilege escalation."""
    cmd = ["docker", "run", "--read-only", "--tmpfs", "/tmp", "--network", network]
    cmd += ["--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
    cmd += ["--detach"] if detach else ["--rm"]
    if name:
        cmd += ["--name", name]
    # The image's own USER unless the test names another (--user, runAsUser).
    if user:
        cmd += ["--user", user]
    for host, container in (volumes or {}).items():
        cmd += ["--volume", f"{host}:{container}"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    return [*cmd, image, *args]


def docker_run(
    image: str, *args: str, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run the image to completion; stdout and stderr together in .stdout."""
    return subprocess.run(
        docker_run_args(image, *args, **kwargs),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def run_in_image(image: str, program: str, *args: str) -> subprocess.CompletedProcess:
    """Run another program of the image (python3, sh) in place of the job."""
    cmd = ["docker", "run", "--rm", "--read-only", "--network", "none"]
    cmd += ["--entrypoint", program, image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def detached(image: str, *args: str, **kwargs) -> Iterator[str]:
    """A detached container (see docker_run_args), removed on exit; yields its name."""
    name = f"mnist-job-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(
        docker_run_args(image, *args, name=name, detach=True, **kwargs),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=120)


def logs(name: str) -> str:
    out = subprocess.run(
        ["docker", "logs", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return out.stdout


def wait_for_log(name: str, needle: str, timeout: float) -> str:
    """Poll the container's log until it contains `needle`; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = logs(name)
        if needle in text:
            return text
        state = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Running}}", name],
            capture_output=True,
            text=True,
        )
        if state.stdout.strip() != "true":
            pytest.fail(f"container exited before logging {needle!r}:\n{logs(name)}")
        time.sleep(0.2)
    pytest.fail(f"no {needle!r} in the log within {timeout} s:\n{logs(name)}")


def exit_code(name: str) -> int:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.ExitCode}}", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def missing_artifacts(out: Path, names: Sequence[str] = ARTIFACTS) -> list[str]:
    return [name for name in names if not (out / name).exists()]
