#!/usr/bin/env python3
"""Run `mnist-job train` as N worker processes on this machine.

Each worker gets a TF_CONFIG naming all N on 127.0.0.1 with free ports, as
Kubeflow or Vertex AI would set it; worker 0 is the chief and the only one
that writes to the output dir. Their output comes out on stderr, each line
led by "[worker I]", except JSON log lines (--log-format json), which name their
worker in their own fields and stay parseable. Exits with the first non-zero
worker exit code.

    python scripts/multiworker.py --workers 2 -- --epochs 1 --output-dir outputs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_GRACE_SECONDS = 10.0  # after SIGTERM, before SIGKILL
# After a worker succeeds, how long the others may take to finish (the chief
# writes the artifacts after the last step) before they are stopped too.
FINISH_GRACE_SECONDS = 60.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(commands: list[list[str]], env: dict | None = None, **popen) -> list:
    """One process per command, each with a TF_CONFIG naming all of them on
    127.0.0.1 with free ports; the first command is worker 0, the chief."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(commands))]}
    workers = []
    for index, command in enumerate(commands):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": json.dumps(tf_config)}
        workers.append(subprocess.Popen(command, env=worker_env, **popen))
    return workers


def exit_code(returncode: int) -> int:
    """A shell's exit code: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(workers: list, grace: float = STOP_GRACE_SECONDS) -> int:
    """Wait for every worker. Once one fails, SIGTERM the others, then SIGKILL
    those still running `grace` seconds later; once one succeeds, the others
    get FINISH_GRACE_SECONDS to finish first. The first failure's exit code, or 0."""
    running, first_failure = dict(enumerate(workers)), None
    stop_at = kill_at = None  # monotonic times
    while running:
        now = time.monotonic()
        for index, worker in list(running.items()):
            if worker.poll() is None:
                continue
            del running[index]
            code = exit_code(worker.returncode)
            if code and first_failure is None:
                first_failure = code
                if running and kill_at is None:
                    print(f"[worker {index}] exited {code}: stopping the others", file=sys.stderr)
                stop_at = now
            elif stop_at is None:
                stop_at = now + FINISH_GRACE_SECONDS
        if running and kill_at is None and stop_at is not None and now >= stop_at:
            for worker in running.values():
                worker.terminate()
            kill_at = now + grace
        if running and kill_at is not None and now >= kill_at:
            for worker in running.values():
                worker.kill()
        time.sleep(0.1)
    return first_failure or 0


def relay(lines, prefix: str) -> None:
    """Copy a worker's output to our stderr, each line led by `prefix` but the
    JSON log lines: they carry task_index already, and a prefix would break them."""
    for line in lines:
        sys.stderr.write(line if line.startswith("{") else prefix + line)
        sys.stderr.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--command",
        default=f"{sys.executable} -m job",
        help="how to start the job (tests substitute a tiny-data wrapper)",
    )
    parser.add_argument("train_args", nargs="*", help="options for `mnist-job train`")
    args = parser.parse_args()

    command = [*args.command.split(), "train", "--strategy", "multi-worker", *args.train_args]
    workers = start_workers(
        [command] * args.workers, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Without a prefix, N workers' identical log lines cannot be told apart.
    relays = [
        threading.Thread(target=relay, args=(worker.stdout, f"[worker {index}] "), daemon=True)
        for index, worker in enumerate(workers)
    ]
    for thread in relays:
        thread.start()

    # Pass SIGTERM/SIGINT on, so stopping the runner checkpoints like a pod eviction.
    def forward(signum, frame):
        for worker in workers:
            worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = supervise(workers)
    for thread in relays:
        thread.join()  # the last lines of every worker, before our own exit
    return code


if __name__ == "__main__":
    sys.exit(main())
