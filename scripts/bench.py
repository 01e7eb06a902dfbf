#!/usr/bin/env python3
"""Benchmark: the seed script as written vs `mnist-job train`, same data, same machine.

The headline is a machine's first run, the one every Kubernetes pod and fresh
container meets: mnist-job with an empty XLA compile cache (a new cache dir per
run, as the image's cache under /tmp starts out in a new pod; page cache warm).
Every run after a machine's first loads the compiled step from the cache; that
figure is the table's secondary column. Each run is a separate whole process;
the variants are interleaved so drift in the machine's speed hits all alike.
Per variant it reports the median of the training loop time, whole-process
wall time, peak RSS, peak anonymous memory (the part of RSS the process
allocated itself, not mapped from libraries), training images/s and test
accuracy, the ratios seed / mnist-job, and whether the targets hold (TARGETS,
on the first run). Then throughput at several batch sizes and with 1 vs 2
local workers, and TensorFlow's own memory floor (scripts/memory_floor.py).
Writes results.json, results.md (the tables, for the docs) and results.png.
The memory a container needs is `make bench-memory` (scripts/memory_limit.py).

    python scripts/bench.py                 # the full benchmark, into bench/
    python scripts/bench.py --smoke --out /tmp/bench   # 1 epoch, CI's check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from job.config import DEFAULTS, dense_layer_shapes

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# The benchmark's variants and their names in the table and chart, the
# headline (a machine's first run: no compile cache) first.
VARIANTS = {
    "seed": "seed",
    "mnist_job_cold": "mnist-job, first run",
    "mnist_job": "mnist-job, compile cache warm",
}
HEADLINE = "mnist_job_cold"

# What mnist-job must reach against the seed on a first run (medians of
# interleaved runs, seed defaults), checked by `check_targets`:
# (name, metric, kind, bound). "faster": seed / job >= bound; "less": job / seed
# <= bound; "at least": job >= bound.
TARGETS = (
    ("training loop", "fit_seconds", "faster", 8.0),
    ("whole process (every artifact written)", "wall_seconds", "faster", 4.0),
    ("peak RSS", "peak_rss_mb", "less", 0.5),
    ("test accuracy", "test_accuracy", "at least", 0.97),
)


def timed(command: list[str], **kwargs) -> tuple[float, dict, str]:
    """Run a whole process; return (wall seconds, its memory, its stdout).

    Memory, in MB: `peak_rss_mb` is the kernel's high-water mark, which also
    counts the pages mapped from shared libraries (TensorFlow's are most of it).
    `peak_anonymous_mb` is what the process itself allocated; the kernel keeps
    no high-water mark for it, so it is sampled every 10 ms.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, **kwargs)
        with _AnonymousMemorySampler(process.pid) as anonymous:
            # wait4 gives this child's own rusage: its peak RSS, not other children's.
            _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode:
            sys.exit(f"bench: {' '.join(command)} failed:\n{stderr.read()[-3000:]}")
        memory = {"peak_rss_mb": usage.ru_maxrss / 1024, "peak_anonymous_mb": anonymous.peak_mb}
        return wall, memory, stdout.read()


class _AnonymousMemorySampler:
    """Polls a process's RssAnon from a thread while the caller waits for it."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.peak_mb = 0.0
        self._status = Path(f"/proc/{pid}/status")
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                status = self._status.read_text()
            except OSError:  # gone; a zombie's status has no RssAnon line either
                continue
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)


def run_seed(npz: Path, work: Path, epochs: int) -> dict:
    wall, memory, stdout = timed(
        [PYTHON, str(ROOT / "scripts" / "seed_baseline.py"), str(npz), str(work / "seed.png"),
         str(epochs)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    report = json.loads(stdout.strip().splitlines()[-1])
    return {
        "fit_seconds": report["fit_seconds"],
        "wall_seconds": wall,
        **memory,
        "images_per_second": report["train_images"] / report["fit_seconds"],
        "test_accuracy": report["test_accuracy"],
    }


def train(command: list[str], out: Path, *options: str) -> tuple[float, dict, dict]:
    """Run a `train` command into `out`; return (wall seconds, memory, its metrics.json)."""
    wall, memory, _ = timed(
        [*command, "--quiet", "--output-dir", str(out), "--overwrite", *options], cwd=ROOT
    )
    return wall, memory, json.loads((out / "metrics.json").read_text())


def run_job(data_dir: Path, compile_cache: Path, out: Path, *options: str) -> dict:
    wall, memory, metrics = train(
        [PYTHON, "-m", "job", "train", "--data-dir", str(data_dir)],
        out,
        "--compile-cache",
        str(compile_cache),
        *options,
    )
    return {
        "fit_seconds": metrics["timings"]["fit_seconds"],
        "wall_seconds": wall,
        **memory,
        "images_per_second": metrics["throughput"]["train_images_per_second"],
        "test_accuracy": metrics["test"]["accuracy"],
        **loop_breakdown(metrics),
    }


def loop_breakdown(metrics: dict) -> dict:
    """Where a run's training loop went, from its metrics.json; {} for one epoch.

    The first epoch also traces and XLA-compiles the step, later ones only run
    it: the difference is the one-time cost. What the loop spent outside the
    epochs went on validation, checkpoints and TensorBoard summaries.
    """
    epoch_seconds = [epoch["seconds"] for epoch in metrics["history"]]
    if len(epoch_seconds) < 2:
        return {}
    steady_epoch = statistics.median(epoch_seconds[1:])
    steps = metrics["train_images"] // metrics["config"]["batch_size"]
    return {
        "compile_seconds": epoch_seconds[0] - steady_epoch,
        "step_microseconds": steady_epoch / steps * 1e6,
        "between_epochs_seconds": metrics["timings"]["fit_seconds"] - sum(epoch_seconds),
    }


def steady_throughput(command: list[str], out: Path, epochs: int) -> float:
    """Images/s of the last epoch of a run: with 2 epochs, the XLA compile in
    the first one does not hide how the step itself scales."""
    _, _, metrics = train(command, out, "--epochs", str(epochs))
    return metrics["history"][-1]["images_per_second"]


def step_gflop(batch_size: int, hidden_units: tuple[int, ...]) -> float:
    """The matrix products of one training step of the MLP, in GFLOP: forward,
    weight gradients, and input gradients of every layer but the first."""
    weights = [fan_in * fan_out for fan_in, fan_out in dense_layer_shapes(hidden_units)]
    return 2 * batch_size * (2 * sum(weights) + sum(weights[1:])) / 1e9


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate on all its cores (numpy's
    BLAS, large square matrices): what the step's products could run at, at best."""
    import numpy as np

    a, b = (np.random.default_rng(0).random((size, size), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best / 1e9


def memory_floor() -> dict:
    """Peak memory (MB) of TensorFlow alone, and with one training step
    compiled, then loaded from XLA's cache as every run after a machine's first
    does (TensorFlow's own cache in a temporary dir: the floor script only)."""
    script = str(ROOT / "scripts" / "memory_floor.py")
    with tempfile.TemporaryDirectory(prefix="mnist-bench-floor-") as cache:
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}",
        }

        def peak(what: str) -> dict:
            return timed([PYTHON, script, what], cwd=ROOT, env=env)[1]

        return {
            "import tensorflow": peak("import"),
            "one compiled step": peak("step"),
            "one step from the compile cache": peak("step"),  # the same step, again
        }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    memory_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    import importlib.metadata as md

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "tensorflow": md.version("tensorflow-cpu"),
        "gpu": "none",
    }


def summarize(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name.replace(", ", ",\n") for name in VARIANTS.values()]
    medians = [results[variant]["median"] for variant in VARIANTS]
    colours = ["#999", "#1f77b4", "#9ecae1"]
    panels = [
        ("Training loop (s)", "fit_seconds"),
        ("Whole process (s)", "wall_seconds"),
        ("Peak RSS (MB)", "peak_rss_mb"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(15, 3.8))
    for ax, (title, key) in zip(axes, panels, strict=False):
        bars = ax.bar(names, [median[key] for median in medians], color=colours)
        ax.bar_label(bars, fmt="%.1f")
        ax.margins(y=0.2)  # room above the bars for their labels and the legend
        ax.tick_params(axis="x", labelsize=8)
        ratio = results["ratios"][key]
        ax.set_title(f"{title}\nmnist-job's first run: {ratio:.1f}x less")
        for _, metric, kind, bound in TARGETS:
            if metric == key:  # where the first run has to be at most
                seed = results["seed"]["median"][key]
                ax.axhline(seed / bound if kind == "faster" else seed * bound,
                           color="#2ca02c", linestyle="-.", linewidth=1,
                           label=f"target ({bound:g}x)")  # fmt: skip
                ax.legend(loc="upper right", fontsize=8, frameon=False)
        if key == "peak_rss_mb":
            anonymous = [median["peak_anonymous_mb"] for median in medians]
            ax.bar(names, anonymous, fill=False, hatch="//", edgecolor="#222",
                   linewidth=0, label="anonymous (rest: mapped libraries)")  # fmt: skip
            floors = results["memory_floor"]
            ax.axhline(floors["one compiled step"]["peak_rss_mb"],
                       color="#d62728", linestyle="--", linewidth=1,
                       label="TensorFlow + one XLA step")  # fmt: skip
            ax.axhline(floors["one step from the compile cache"]["peak_rss_mb"],
                       color="#d62728", linestyle=":", linewidth=1,
                       label="the same, loaded from the cache")  # fmt: skip
            ax.margins(y=0.6)  # and room for a three-line legend
            ax.legend(loc="upper right", fontsize=8, frameon=False)
    scaling = results["batch_scaling"]
    ax = axes[-1]
    ax.bar([str(b) for b in scaling], [v / 1000 for v in scaling.values()], color="#1f77b4")
    ax.set_title("mnist-job steady throughput\nby batch size (k images/s)")
    fig.suptitle(f"{results['machine']['cpu']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


SMALLER_IS_BETTER = ("fit_seconds", "wall_seconds", "peak_rss_mb", "peak_anonymous_mb")

# The table's rows: (name, metric, format of a value).
ROWS = (
    ("training loop", "fit_seconds", "{:.2f} s"),
    ("whole process (every artifact written)", "wall_seconds", "{:.2f} s"),
    ("peak RSS", "peak_rss_mb", "{:.0f} MB"),
    ("peak anonymous memory (sampled every 10 ms)", "peak_anonymous_mb", "{:.0f} MB"),
    ("training images/s", "images_per_second", "{:,.0f}"),
    ("test accuracy", "test_accuracy", "{:.4f}"),
)


def compare(key: str, seed: float, job: float) -> str:
    """How mnist-job's `job` compares with the seed's, as the table says it."""
    if key in ("fit_seconds", "wall_seconds"):
        return f"{seed / job:.2f}x faster"
    if key in ("peak_rss_mb", "peak_anonymous_mb"):
        return f"{job / seed:.2f}x the seed's"
    if key == "test_accuracy":
        return f"{job - seed:+.4f}"
    return f"{job / seed:.2f}x"


def table(results: dict) -> str:
    """The medians as a markdown table: the seed, mnist-job's first run (the
    headline), then mnist-job with a warm compile cache."""
    seed = results["seed"]["median"]
    jobs = [variant for variant in VARIANTS if variant != "seed"]
    short = {"mnist_job_cold": "first run is", "mnist_job": "warm cache is"}
    header = " | ".join(f"{VARIANTS[job]} | {short[job]}" for job in jobs)
    lines = [f"| | seed | {header} |", "|---|---:" + "|---:|---" * len(jobs) + "|"]
    for name, key, fmt in ROWS:
        cells = [name, fmt.format(seed[key])]
        for job in jobs:
            value = results[job]["median"][key]
            cells += [fmt.format(value), compare(key, seed[key], value)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(seed: dict, job: dict) -> list[dict]:
    """Each of TARGETS against the medians of the seed and of mnist-job: the
    value compared with the bound (a ratio, or the job's own value) and
    whether it holds."""
    checks = []
    for name, key, kind, bound in TARGETS:
        if kind == "faster":
            value, holds = seed[key] / job[key], seed[key] / job[key] >= bound
        elif kind == "less":
            value, holds = job[key] / seed[key], job[key] / seed[key] <= bound
        elif kind == "at least":
            value, holds = job[key], job[key] >= bound
        else:
            raise ValueError(f"target {name}: unknown kind {kind!r}")
        checks.append(
            {"name": name, "metric": key, "kind": kind, "bound": bound, "value": value,
             "seed": seed[key], "job": job[key], "holds": bool(holds)}
        )  # fmt: skip
    return checks


def target_line(check: dict) -> str:
    """`PASS training loop: 8.12x faster than the seed (target >= 8x; ...)`."""
    fmt = next(fmt for _, key, fmt in ROWS if key == check["metric"])
    seed, job = fmt.format(check["seed"]), fmt.format(check["job"])
    verdict = "PASS" if check["holds"] else "MISS"
    if check["kind"] == "faster":
        said = f"{check['value']:.2f}x faster than the seed (target >= {check['bound']:g}x"
    elif check["kind"] == "less":
        said = f"{check['value']:.2f}x the seed's (target <= {check['bound']:g}x"
    else:
        said = f"{job} (target >= {check['bound']:g}"
    return f"{verdict} {check['name']}: {said}; seed {seed}, mnist-job first run {job})"


def details(results: dict) -> str:
    """What the table leaves out: scaling, the memory floor, where the loop went."""
    lines = []
    scaling = ", ".join(f"{b}: {v:,.0f}" for b, v in results["batch_scaling"].items())
    lines.append(f"images/s by batch size (steady state): {scaling}")
    workers = ", ".join(f"{w}: {v:,.0f}" for w, v in results["workers"].items())
    lines.append(f"images/s by local workers (steady state, global batch 32): {workers}")
    floor = ", ".join(
        f"{what}: {mb['peak_rss_mb']:.0f} MB ({mb['peak_anonymous_mb']:.0f} MB anonymous)"
        for what, mb in results["memory_floor"].items()
    )
    lines.append(f"peak RSS without the job's data or artifacts: {floor}")
    for job in (variant for variant in VARIANTS if variant != "seed"):
        median = results[job]["median"]
        if "step_microseconds" in median:
            line = loop_line(median, results["step_gflop"], results["machine"]["matmul_gflops"])
            lines.append(f"{VARIANTS[job]}: {line}")
    return "\n".join(lines)


def machine_line(results: dict) -> str:
    m = results["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu']}; "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}; epochs {results['epochs']}, "
        f"batch {results['batch_size']}, median of {results['repeats']} interleaved runs"
    )


def report(results: dict) -> str:
    """What bench prints and writes to results.md: markdown."""
    targets = "\n".join(f"- {target_line(check)}" for check in results["targets"])
    return "\n\n".join(
        [
            "mnist-job against the seed on a machine's first run (empty compile cache):",
            machine_line(results),
            table(results),
            f"Targets, on the first run:\n\n{targets}",
            details(results),
        ]
    )


def loop_line(job: dict, step_gflop: float, peak: float) -> str:
    step_rate = step_gflop / (job["step_microseconds"] / 1e6)
    return (
        f"training loop: {job['compile_seconds']:.2f} s tracing the step and compiling it (or "
        f"loading it from the compile cache) once, then {job['step_microseconds']:.0f} µs a step "
        f"({step_rate:.0f} GFLOP/s of matrix products, {step_rate / peak:.0%} of this machine's "
        f"float32 matmul rate, {peak:.0f} GFLOP/s), and {job['between_epochs_seconds']:.2f} s "
        "validating and checkpointing between epochs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 1 repeat: checks it runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.epochs = 1, 1
    batch_sizes = [2048] if args.smoke else [32, 128, 512, 2048]
    epochs = 1 if args.smoke else 2  # for the scaling figures: the last epoch counts

    fetch = [PYTHON, "-m", "job", "data", "fetch"]
    if args.data_dir:
        fetch += ["--data-dir", str(args.data_dir)]
    npz = Path(subprocess.check_output(fetch, cwd=ROOT, text=True).strip().splitlines()[-1])
    data_dir = npz.parent

    results: dict = {
        "machine": {**machine(), "matmul_gflops": matmul_gflops()},
        "epochs": args.epochs,
        "repeats": args.repeats,
        "batch_size": DEFAULTS.batch_size,
        "step_gflop": step_gflop(DEFAULTS.batch_size, DEFAULTS.hidden_units),
    }
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        work = Path(tmp)
        warm_cache = work / "compile-cache"
        # Fills the warm cache: the step's program does not depend on --epochs.
        run_job(data_dir, warm_cache, work / "job", "--epochs", "1")
        for repeat in range(args.repeats):
            full_run = ("--epochs", str(args.epochs))
            runs["seed"].append(run_seed(npz, work, args.epochs))
            # A first run: a cache dir of its own, empty, as in a new pod.
            cold_cache = work / f"cold-cache-{repeat}"
            runs["mnist_job_cold"].append(run_job(data_dir, cold_cache, work / "job", *full_run))
            runs["mnist_job"].append(run_job(data_dir, warm_cache, work / "job", *full_run))
            print(f"repeat {repeat + 1}/{args.repeats}: training loop " + ", ".join(
                f"{VARIANTS[variant]} {variant_runs[-1]['fit_seconds']:.2f} s"
                for variant, variant_runs in runs.items()
            ), flush=True)  # fmt: skip
        for variant, variant_runs in runs.items():
            results[variant] = {"runs": variant_runs, "median": summarize(variant_runs)}
        seed = results["seed"]["median"]
        for variant in ("mnist_job", "mnist_job_cold"):
            results[variant]["ratios"] = {
                key: seed[key] / results[variant]["median"][key] for key in SMALLER_IS_BETTER
            }
        # The headline: what a pod or fresh container gets.
        results["headline"] = HEADLINE
        results["ratios"] = results[HEADLINE]["ratios"]
        results["targets"] = check_targets(seed, results[HEADLINE]["median"])
        train = [
            PYTHON, "-m", "job", "train", "--data-dir", str(data_dir),
            "--compile-cache", str(warm_cache),
        ]  # fmt: skip
        results["batch_scaling"] = {
            batch: steady_throughput([*train, "--batch-size", str(batch)], work / "batch", epochs)
            for batch in batch_sizes
        }
        multiworker = [PYTHON, "scripts/multiworker.py"]
        results["workers"] = {
            workers: steady_throughput(
                [*multiworker, f"--workers={workers}", "--", "--data-dir", str(data_dir)],
                work / "workers",
                epochs,
            )
            for workers in (1, 2)
        }
        results["memory_floor"] = memory_floor()
        args.out.mkdir(parents=True, exist_ok=True)
        # A sample of what the job writes, for the README.
        shutil.copy(work / "job" / "predictions.png", args.out / "predictions.png")

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "results.png")
    text = report(results)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'} and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
