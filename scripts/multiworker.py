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
    codes = [worker.wait() for worker in workers]
    for thread in relays:
        thread.join()  # the last lines of every worker, before our own exit
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
