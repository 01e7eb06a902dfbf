"""Object stores for the tests: an S3 API server (moto) and a GCS JSON API
server (gcp-storage-emulator), each started on 127.0.0.1 for the session.

The job reaches them as it reaches the clouds, through the standard endpoint
variables: `AWS_ENDPOINT_URL` for S3, `STORAGE_EMULATOR_HOST` for GCS. The
session sets both (with dummy AWS credentials), so in-process runs and
subprocesses alike talk to these servers, never to a cloud.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# What the clients need to reach the local servers and nothing else.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No ~/.aws of whoever runs the tests, no instance metadata lookups.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within 60 s")


@contextlib.contextmanager
def serving(command: list[str], port: int, what: str, env: dict | None = None) -> Iterator[str]:
    """Run a server `command` listening on 127.0.0.1:`port`; yield its URL."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process, what)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def moto_server(env: dict | None = None, host: str = "127.0.0.1"):
    """An S3 API server; `host` 0.0.0.0 lets containers reach it too."""
    port = free_port()
    command = [str(BIN / "moto_server"), "-H", host, "-p", str(port)]
    return serving(command, port, "moto_server (S3)", env)


def gcs_emulator():
    port = free_port()
    command = [
        str(BIN / "gcp-storage-emulator"),
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--in-memory",
        "--quiet",
    ]
    return serving(command, port, "gcp-storage-emulator (GCS)")


@dataclass(frozen=True)
class Store:
    """One of the local object stores: `uri(...)` names a fresh bucket in it."""

    scheme: str  # "s3" or "gs"
    env: dict  # what a subprocess needs to reach it (already in os.environ)

    def bucket(self) -> str:
        """A new, empty bucket; its URI, e.g. s3://test-1a2b3c."""
        import fsspec

        name = f"test-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem(self.scheme, skip_instance_cache=True)
        fs.mkdir(name)
        return f"{self.scheme}://{name}"

    def uri(self, path: str = "run") -> str:
        """A prefix in a new bucket, e.g. gs://test-1a2b3c/run."""
        return f"{self.bucket()}/{path}"


@pytest.fixture(scope="session")
def stores() -> Iterator[dict[str, Store]]:
    """Both local stores, their endpoints set in this process's environment.
    Provided by tests/conftest.py: a test module that imports it defines a
    second one, whose servers would replace these endpoints mid-session."""
    if os.environ.get("MNIST_JOB_TEST_STORES"):
        raise RuntimeError("the stores fixture started twice: don't import it, conftest has it")
    with moto_server() as s3_url, gcs_emulator() as gcs_url:
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_url, "STORAGE_EMULATOR_HOST": gcs_url}
        env["MNIST_JOB_TEST_STORES"] = "1"
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield {"s3": Store("s3", env), "gs": Store("gs", env)}
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(params=["s3", "gs"])
def store(request, stores) -> Store:
    """Each local store in turn."""
    return stores[request.param]


class FlakyProxy:
    """A TCP proxy to `target_url` that can cut the network: `cut()` drops
    every open connection and refuses new ones until `restore()`, as a
    failing network would."""

    def __init__(self, target_url: str):
        import threading

        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.down = False
        self.open: set[socket.socket] = set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.down = True
        for sock in list(self.open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.down = False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            self._threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as upstream:
            self.open |= {client, upstream}
            pumps = [
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True)
                for a, b in ((client, upstream), (upstream, client))
            ]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
            self.open -= {client, upstream}

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.cut()
        self.server.close()
