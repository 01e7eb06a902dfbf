#!/usr/bin/env python3
"""The smallest container memory limit at which a seed-default run completes.

Memory is set where users set it: a container's limit (Kubernetes'
`resources.limits.memory`). Each run here is a fresh container,
`docker run --memory M --memory-swap M` (swap off, as a kubelet runs pods),
with the seed's defaults (5 epochs, batch 32, all 60k images):

- job:  `mnist-job train` in the CPU image, as a pod runs it (a new container,
        so an empty compile cache: a machine's first run);
- seed: scripts/seed_baseline.py (the seed's training as written) with the
        same image's Python, the repo's scripts/ and MNIST's npz mounted
        read-only.

A run completes when it exits 0 within --timeout; anything else (137 and
OOMKilled, mostly) is a failure. The limit is bisected over multiples of --step MiB between a
limit that fails and one that completes (both checked first). Peak RSS
overstates what a container needs: under its limit, the cgroup reclaims the
file-backed pages of TensorFlow's libraries and reads them again when needed.

    python scripts/memory_limit.py                # both, into bench/memory.json
    python scripts/memory_limit.py --only job --repeats 2   # each limit twice

Needs a Docker engine and the image (`make docker-cpu`).
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DOCKER = "docker"
STEP_MIB = 32
# Where to look (MiB): (fails, completes). Measured before: the job completed
# at 448 and was killed at 384, the seed was killed at 1024, completed at 1280.
BOUNDS = {"job": (256, 1024), "seed": (512, 2048)}
NAMES = {"job": "mnist-job", "seed": "seed"}
SEED_DIR = "/seed"  # the repo's scripts/, read-only
SEED_NPZ = "/data/mnist.npz"  # MNIST, read-only


def docker_run(target: str, limit_mib: int, image: str, name: str, npz: Path | None) -> list[str]:
    """The `docker run` of one seed-default run of `target` under `limit_mib`."""
    limit = f"{limit_mib}m"
    args = [DOCKER, "run", "--name", name, "--memory", limit, "--memory-swap", limit]
    args += ["--network", "none"]
    if target == "job":
        return [*args, image, "train"]
    if target == "seed":
        if npz is None:
            raise ValueError("the seed needs MNIST's npz")
        return [
            *args,
            "--volume", f"{ROOT / 'scripts'}:{SEED_DIR}:ro",
            "--volume", f"{npz.resolve()}:{SEED_NPZ}:ro",
            "--entrypoint", "python3", image,
            f"{SEED_DIR}/seed_baseline.py", SEED_NPZ, "/tmp/seed.png", "5",
        ]  # fmt: skip
    raise ValueError(f"unknown target {target!r}: job or seed")


def run_container(command: list[str], name: str, timeout: float) -> dict:
    """Run it to the end; its exit code, whether the OOM killer ended it, and
    how long it took. A run still going after `timeout` seconds (thrashing
    just above its need, reading its libraries back again and again) is
    stopped and counts as a failure. The container is removed afterwards."""
    started = time.perf_counter()
    timed_out = False
    try:
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=timeout
            )
            output = result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            timed_out = True
            subprocess.run([DOCKER, "kill", name], capture_output=True)
            output = "".join(
                part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                for part in (expired.stdout, expired.stderr)
            )
        seconds = time.perf_counter() - started
        state = subprocess.run(
            [DOCKER, "inspect", "--format", "{{.State.OOMKilled}} {{.State.ExitCode}}", name],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        subprocess.run([DOCKER, "rm", "--force", "--volumes", name], capture_output=True)
    if state.returncode:  # never created: no such image, no engine
        sys.exit(f"memory_limit: {' '.join(command)} failed:\n{output[-2000:]}")
    oom_killed, exit_code = state.stdout.split()
    failed = timed_out or int(exit_code) != 0
    return {
        "exit_code": int(exit_code) if not timed_out else None,
        "oom_killed": oom_killed == "true",
        "timed_out": timed_out,
        "seconds": round(seconds, 1),
        "log_tail": output[-600:] if failed else "",
    }


def smallest_limit(
    completes: Callable[[int], bool], low: int, high: int, step: int = STEP_MIB
) -> tuple[int | None, int | None]:
    """(smallest limit that completes, largest one below it that fails), over
    multiples of `step` in [low, high], assuming more memory never hurts.

    Checks `high` first, then `low`: (None, high) if even `high` fails,
    (low, None) if `low` already completes. Then bisects, keeping a failing
    lower and a completing upper end, until they are `step` apart.
    """
    if low % step or high % step or not 0 < low < high:
        raise ValueError(f"bounds {low}, {high}: need 0 < low < high, multiples of {step}")
    if not completes(high):
        return None, high
    if completes(low):
        return low, None
    while high - low > step:
        middle = low + (high - low) // step // 2 * step
        if completes(middle):
            high = middle
        else:
            low = middle
    return high, low


def measure(target: str, image: str, npz: Path | None, bounds: tuple[int, int],
            step: int, repeats: int, timeout: float) -> dict:  # fmt: skip
    runs: list[dict] = []

    def completes(limit_mib: int) -> bool:
        for _ in range(repeats):
            name = f"mnist-job-memory-{target}-{secrets.token_hex(3)}"
            run = {"limit_mib": limit_mib, **run_container(
                docker_run(target, limit_mib, image, name, npz), name, timeout
            )}  # fmt: skip
            runs.append(run)
            if run["timed_out"]:
                verdict = f"stopped after {timeout:g} s"
            elif run["oom_killed"]:
                verdict = "OOM-killed"
            else:
                verdict = "completed" if run["exit_code"] == 0 else f"exit {run['exit_code']}"
            print(f"{NAMES[target]}: {limit_mib} MiB: {verdict} in {run['seconds']} s", flush=True)
            if run["exit_code"] != 0:
                return False
        return True

    completed, failed = smallest_limit(completes, *bounds, step=step)
    return {"completed_mib": completed, "failed_mib": failed, "runs": runs}


def table(results: dict) -> str:
    """The measured limits as a markdown table."""

    def mib(value: int | None, bound: str) -> str:
        return f"{value} MiB" if value is not None else bound

    def seconds(runs: list[dict], limit: int | None) -> str:
        took = [
            run["seconds"] for run in runs if run["limit_mib"] == limit and run["exit_code"] == 0
        ]
        return f"{max(took):.1f} s" if took else "-"

    lines = [
        f"| `docker run --memory M --memory-swap M`, seed defaults, {results['step_mib']} MiB "
        "steps | completes at | fails at | run time there | with the most memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for target, measured in results["targets"].items():
        low, high = measured["bounds_mib"]
        runs = measured["runs"]
        lines.append(
            f"| {NAMES[target]} | {mib(measured['completed_mib'], f'> {high} MiB')} "
            f"| {mib(measured['failed_mib'], f'< {low} MiB')} "
            f"| {seconds(runs, measured['completed_mib'])} | {seconds(runs, high)} ({high} MiB) |"
        )
    job, seed = (results["targets"].get(t, {}).get("completed_mib") for t in ("job", "seed"))
    if job and seed:
        lines.append(f"\nmnist-job needs {job / seed:.2f}x the seed's memory limit")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="mnist-job:cpu")
    parser.add_argument("--only", choices=sorted(BOUNDS), help="measure one of them only")
    parser.add_argument("--step", type=int, default=STEP_MIB, help="MiB [default: 32]")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per limit, all must complete [default: 1]")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a run may take before it counts as failed "
                        "[default: 600]")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=None, help="where MNIST's npz is")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "memory.json")
    for target, (low, high) in BOUNDS.items():
        parser.add_argument(f"--{target}-bounds", type=int, nargs=2, default=[low, high],
                            metavar=("FAILS", "COMPLETES"),
                            help=f"MiB to bisect between [default: {low} {high}]")  # fmt: skip
    args = parser.parse_args()
    targets = [args.only] if args.only else list(BOUNDS)

    image_id = subprocess.run(
        [DOCKER, "image", "inspect", "--format", "{{.Id}}", args.image],
        capture_output=True,
        text=True,
        check=False,
    )
    if image_id.returncode:
        sys.exit(f"memory_limit: no image {args.image} (make docker-cpu): {image_id.stderr}")
    npz = None
    if "seed" in targets:
        fetch = [PYTHON, "-m", "job", "data", "fetch"]
        if args.data_dir:
            fetch += ["--data-dir", str(args.data_dir)]
        npz = Path(subprocess.check_output(fetch, cwd=ROOT, text=True).strip().splitlines()[-1])

    results: dict = {
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": args.image,
        "image_id": image_id.stdout.strip(),
        "step_mib": args.step,
        "repeats": args.repeats,
        "targets": {},
    }
    for target in targets:
        bounds = tuple(getattr(args, f"{target}_bounds"))
        measured = measure(target, args.image, npz, bounds, args.step, args.repeats, args.timeout)
        results["targets"][target] = {"bounds_mib": list(bounds), **measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
