"""The workers of a multi-worker run meet before TensorFlow joins them.

MultiWorkerMirroredStrategy's constructor waits in C++ until every worker has
joined: with no deadline, holding the GIL (no Python thread runs), and with
TensorFlow's own SIGTERM handler (for preemption notices) taking the signal.
A worker whose peer never came waited forever, and only SIGKILL ended it.

So the workers meet first, in Python. The chief (TensorFlow's coordination
leader) listens on its own gRPC port; every other worker connects to it and
says who it is. Once all have, and none has left, the chief tells them to go
and closes the port, and each creates its strategy, which then finds every
peer within a second or two. While they wait, SIGTERM ends the process at
once (exit 143, as in the rest of set-up), a line every 30 s says who is
missing, and a worker that has not met every peer within the join timeout
exits 1 with one line naming them.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from dataclasses import dataclass

from job.errors import ConfigError, WorkerLost

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a worker retries the chief, and the chief looks up
PROGRESS_SECONDS = 30.0  # between "still waiting" lines
LINGER_SECONDS = 2.0  # the chief waits this long for the others to hang up after "go"
JOINING_TYPES = ("chief", "worker")  # the tasks TensorFlow's coordination service waits for


@dataclass(frozen=True)
class Task:
    type: str
    index: int
    address: str  # host:port

    @property
    def name(self) -> str:
        return f"{self.type} {self.index} ({self.address})"


def joining_tasks(spec: dict[str, list[str]]) -> list[Task]:
    """The tasks that join, the leader first: the chief task, else worker 0."""
    return [
        Task(kind, index, address)
        for kind in JOINING_TYPES
        for index, address in enumerate(spec.get(kind, []))
    ]


def names(tasks) -> str:
    return ", ".join(task.name for task in tasks)


def meet(spec: dict[str, list[str]], task_type: str, task_index: int, timeout: float) -> None:
    """Return once every joining task of `spec` has met the chief; WorkerLost
    naming the missing ones after `timeout` seconds."""
    tasks = joining_tasks(spec)
    me = next((t for t in tasks if (t.type, t.index) == (task_type, task_index)), None)
    if me is None or len(tasks) < 2:
        return  # an evaluator, say, or a one-worker group: nobody to wait for
    log.info("Waiting for all %d workers to join (--join-timeout %g s)", len(tasks), timeout)
    waiting = _Waiting(timeout)
    if me == tasks[0]:
        _lead(me, tasks[1:], waiting)
    else:
        _follow(me, tasks[0], waiting)
    log.info("All %d workers have joined", len(tasks))


class _Waiting:
    """The deadline, and the progress line every PROGRESS_SECONDS."""

    def __init__(self, timeout: float):
        self.timeout, self.started = timeout, time.monotonic()
        self.next_report = self.started + PROGRESS_SECONDS

    def left(self) -> float:
        return self.started + self.timeout - time.monotonic()

    def check(self, missing: str) -> None:
        if self.left() <= 0:
            raise WorkerLost(f"workers did not join within {self.timeout:g} s: {missing}")
        if time.monotonic() >= self.next_report:
            self.next_report += PROGRESS_SECONDS
            elapsed = time.monotonic() - self.started
            log.info("Still waiting after %.0f s of %g s: %s", elapsed, self.timeout, missing)


def _address(task: Task) -> tuple[str, int]:
    host, _, port = task.address.rpartition(":")
    return host.strip("[]"), int(port)


def _lead(me: Task, others: list[Task], waiting: _Waiting) -> None:
    try:
        server = socket.create_server(("", _address(me)[1]))  # all interfaces, as gRPC's
    except OSError as err:
        raise ConfigError(f"cannot listen on {me.address} for the other workers: {err}") from None
    joined: dict[socket.socket, Task] = {}
    pending: dict[socket.socket, bytes] = {}  # connected, not yet said who they are
    try:
        while True:
            missing = [task for task in others if task not in joined.values()]
            wait = min(POLL_SECONDS, max(waiting.left(), 0)) if missing else 0
            ready, _, _ = select.select([server, *joined, *pending], [], [], wait)
            for sock in ready:
                if sock is server:
                    pending[server.accept()[0]] = b""
                elif (sock in joined or sock in pending) and not _receive(  # not one just closed
                    sock, joined, pending, others
                ):
                    sock.close()
            still_missing = [task for task in others if task not in joined.values()]
            if not still_missing and not ready:
                break  # everyone is here, and nobody left since the last look
            if still_missing != missing:
                _tell(joined, b"wait " + names(still_missing).encode() + b"\n")
            waiting.check(f"missing {names(still_missing)}")
        _tell(joined, b"go\n")
        # They hang up first, so no connection lingers on the port TensorFlow binds next.
        deadline = time.monotonic() + LINGER_SECONDS
        while joined and time.monotonic() < deadline:
            ready, _, _ = select.select(list(joined), [], [], deadline - time.monotonic())
            for sock in ready:
                del joined[sock]
                sock.close()
    finally:
        for sock in [*joined, *pending, server]:
            sock.close()


def _receive(sock, joined: dict, pending: dict, others: list[Task]) -> bool:
    """Read what a connected worker sent; False once it is gone (or not one of ours)."""
    try:
        data = sock.recv(256)
    except OSError:
        data = b""
    if sock in joined:
        if not data:
            log.warning("%s left before every worker joined", joined.pop(sock).name)
        return bool(data)
    buffer = pending.pop(sock) + data
    if not data or len(buffer) > 256:
        return False
    if b"\n" not in buffer:
        pending[sock] = buffer
        return True
    said = buffer.split(b"\n")[0].decode(errors="replace").split(" ")
    task = next((t for t in others if ["join", t.type, str(t.index)] == said), None)
    if task is None:
        return False
    for old, known in list(joined.items()):
        if known == task:  # a restarted worker: its new connection counts
            joined.pop(old).close()
    joined[sock] = task
    log.info("%s joined", task.name)
    return True


def _tell(joined: dict, message: bytes) -> None:
    for sock in list(joined):
        with contextlib.suppress(OSError):  # gone: the next select sees it
            sock.sendall(message)


def _follow(me: Task, leader: Task, waiting: _Waiting) -> None:
    status = f"the chief, {leader.name}, has not started"
    sock, buffer = None, b""
    try:
        while True:
            waiting.check(status)
            if sock is None:
                try:
                    sock = socket.create_connection(
                        _address(leader), timeout=min(1.0, max(waiting.left(), 0.01))
                    )
                    sock.sendall(f"join {me.type} {me.index}\n".encode())
                except OSError:
                    sock = None
                    time.sleep(POLL_SECONDS)
                    continue
                if status.endswith("has not started"):
                    status = f"the chief, {leader.name}, is waiting for the others"
            ready, _, _ = select.select([sock], [], [], min(POLL_SECONDS, max(waiting.left(), 0)))
            if not ready:
                continue
            try:
                data = sock.recv(1024)
            except OSError:
                data = b""
            if not data:  # the chief is gone, or restarting: try again
                sock.close()
                sock, buffer = None, b""
                continue
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                if line == b"go":
                    return
                if line.startswith(b"wait "):
                    status = f"missing {line[5:].decode(errors='replace')}"
    finally:
        if sock is not None:
            sock.close()
