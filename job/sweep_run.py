"""Running a sweep's trials: one in this process (`sweep trial`, what each pod
of k8s/sweep.yaml runs), or all of them from here, at most P at once, each in
a process of its own (`sweep run`).

A trial is an ordinary training run into `<sweep dir>/trial-<i>`, so it
inherits everything `train` does: metrics.json written last means finished,
a rerun resumes from the checkpoint, SIGTERM checkpoints and exits 143. What
the sweep adds: a finished trial is not run again, a failed one leaves
`failed.json` (its exit code and one-line error) for the report, and the
trials running at once share the CPUs instead of each sizing its thread pools
for the whole machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from job import storage, sweep
from job.errors import ConfigError, ExitCode, JobError, Terminated
from job.strategy import cpu_threads

log = logging.getLogger(__name__)

FAILED_FILE = "failed.json"  # in a trial's dir: why its last attempt failed
# Codes that mean "stopped on request, resumable": not a failure of the trial.
STOPPED = (ExitCode.TERMINATED, ExitCode.INTERRUPTED, -signal.SIGTERM, -signal.SIGINT)
POLL_SECONDS = 0.2


class Interrupted(JobError):
    exit_code = ExitCode.INTERRUPTED


def trial_file(sweep_dir, index: int, name: str):
    return sweep.path_in(sweep.trial_dir(sweep_dir, index), name)


def final_metrics(metrics: dict) -> dict[str, float]:
    """What a trial reports: its test metrics, named as a spec ranks by them."""
    return {name: metrics["test"][name.removeprefix("test_")] for name in sweep.METRICS}


def trial_config(spec: sweep.Sweep, index: int, sweep_dir):
    """The TrainConfig of trial `index`, into its dir under `sweep_dir`."""
    if not 0 <= index < len(spec.trials):
        raise ConfigError(
            f"--index {index}: the sweep has {len(spec.trials)} trials (0-{len(spec.trials) - 1})"
        )
    return sweep.train_config(spec.trials[index], sweep.trial_dir(sweep_dir, index))


def run_trial(spec: sweep.Sweep, index: int, sweep_dir, config) -> dict[str, float]:
    """Train trial `index` here (`config`: its trial_config), or find it
    finished; its final metrics."""
    sweep.record(spec, sweep_dir)
    finished = sweep.read_json(trial_file(sweep_dir, index, "metrics.json"))
    if finished is not None:
        log.info("Trial %d already finished: not run again", index)
        return final_metrics(finished)
    failed = trial_file(sweep_dir, index, FAILED_FILE)
    _delete(failed)
    log.info("Trial %d of %d: %s", index, len(spec.trials), " ".join(sweep.train_args(
        spec.trials[index])) or "defaults")  # fmt: skip
    from job.runner import run

    try:
        result = run(config)
    except JobError as err:
        if err.exit_code not in STOPPED:
            _record_failure(failed, err.exit_code, str(err))
        raise
    except Exception as err:
        _record_failure(failed, ExitCode.FAILURE, f"{type(err).__name__}: {err}")
        raise
    return final_metrics(result.metrics)


def _record_failure(path, code: int, error: str) -> None:
    try:
        sweep.write_json(path, {"exit_code": int(code), "error": error})
    except (OSError, JobError) as err:  # the failure itself may be the volume's
        log.warning("Could not record the trial's failure in %s: %s", path, err)


def _delete(path) -> None:
    if storage.is_uri(path):
        storage.delete(str(path))
    else:
        Path(path).unlink(missing_ok=True)


def entry_point() -> list[str]:
    """The command this process was started as, to start each trial the same
    way: `python -m job`, the `mnist-job` script, or another entry point
    (tests start the sweep through one that trains on tiny data)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, sys.argv[0]]


def cpu_slots(parallel: int) -> list[set[int]]:
    """The CPUs each of `parallel` concurrent trials gets: disjoint sets of
    cpu_threads() // parallel cores (at least one), so that each trial's
    TensorFlow sizes its thread pools for its share (job/strategy.py reads
    the affinity) and P trials never run more threads than there are cores."""
    cores = sorted(os.sched_getaffinity(0))
    each = max(1, cpu_threads() // parallel)
    return [
        {cores[(slot * each + j) % len(cores)] for j in range(each)} for slot in range(parallel)
    ]


@dataclass
class _Running:
    index: int
    slot: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    finished: list[int] = field(default_factory=list)  # this run or an earlier one
    failed: dict[int, int] = field(default_factory=dict)  # index -> exit code
    stopped: list[int] = field(default_factory=list)  # by SIGTERM or Ctrl-C: resumable


def run_all(spec_path: Path, spec: sweep.Sweep, sweep_dir: Path, parallel: int) -> Outcome:
    """Every trial not yet finished, at most `parallel` at once; a failed one
    does not stop the others. SIGTERM or Ctrl-C stops them all (each
    checkpoints and exits 143), then raises Terminated or Interrupted."""
    if storage.is_uri(sweep_dir):
        raise ConfigError("sweep run: --output-dir must be a local dir (use `sweep trial` per "
                          "index to run trials into a bucket)")  # fmt: skip
    sweep.record(spec, sweep_dir)
    outcome = Outcome()
    pending = []
    for index in range(len(spec.trials)):
        done = (sweep.trial_dir(sweep_dir, index) / "metrics.json").exists()
        (outcome.finished if done else pending).append(index)
    if outcome.finished:
        log.info("%d of %d trials already finished", len(outcome.finished), len(spec.trials))
    slots = cpu_slots(parallel)
    log.info("Running %d trials, %d at once, %d CPU thread(s) each",
             len(pending), parallel, len(slots[0]))  # fmt: skip
    stop = _StopRequest()
    with stop.catching():
        _schedule(spec_path, sweep_dir, pending, slots, outcome, stop)
    if stop.signal == signal.SIGTERM:
        raise Terminated(f"stopped by SIGTERM: trials {outcome.stopped} checkpointed; "
                         "rerun the same command to resume")  # fmt: skip
    if stop.signal == signal.SIGINT:
        raise Interrupted(f"interrupted: trials {outcome.stopped} checkpointed; "
                          "rerun the same command to resume")  # fmt: skip
    return outcome


def _schedule(spec_path, sweep_dir: Path, pending: list[int], slots, outcome, stop) -> None:
    free, running = list(range(len(slots))), []
    while True:
        while pending and free and stop.signal is None:
            running.append(_start(spec_path, sweep_dir, pending.pop(0), free.pop(0), slots))
        stop.forward([r.process for r in running])
        if not running:
            return
        time.sleep(POLL_SECONDS)
        for trial in [r for r in running if r.process.poll() is not None]:
            running.remove(trial)
            free.append(trial.slot)
            _finished(trial, sweep_dir, outcome)


def _start(spec_path, sweep_dir: Path, index: int, slot: int, slots) -> _Running:
    command = [*entry_point(), "sweep", "trial", str(spec_path), "--index", str(index),
               "--output-dir", str(sweep_dir)]  # fmt: skip
    log_path = sweep_dir / f"trial-{index}.log"
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches the sweep alone, which then
            # stops each trial with SIGTERM (a checkpoint, exit 143).
            start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, slots[slot]),
        )
    log.info("Trial %d started (log: %s)", index, log_path)
    return _Running(index, slot, process)


def _finished(trial: _Running, sweep_dir: Path, outcome: Outcome) -> None:
    code, seconds = trial.process.returncode, time.monotonic() - trial.started
    if code == 0:
        outcome.finished.append(trial.index)
        log.info("Trial %d finished in %.1f s", trial.index, seconds)
    elif code in STOPPED:
        outcome.stopped.append(trial.index)
        log.info("Trial %d stopped (exit %d): it resumes on a rerun", trial.index, code)
    else:
        code = code if code > 0 else 128 - code  # killed by a signal: as a shell shows it
        outcome.failed[trial.index] = code
        failed = trial_file(sweep_dir, trial.index, FAILED_FILE)
        if not failed.exists():  # killed before it could say why (OOM killer, SIGKILL)
            _record_failure(failed, code, f"killed (exit {code})")
        error = sweep.read_json(failed)["error"]
        log.warning("Trial %d failed (exit %d) after %.1f s: %s", trial.index, code, seconds, error)


class _StopRequest:
    """SIGTERM or SIGINT received by the sweep: start no more trials, and pass
    SIGTERM on to the running ones (once each)."""

    def __init__(self):
        self.signal = None
        self._told = set()

    def _receive(self, signum, frame) -> None:
        self.signal = self.signal or signum

    def forward(self, processes) -> None:
        if self.signal is None:
            return
        for process in processes:
            if process.pid not in self._told:
                self._told.add(process.pid)
                process.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {signum: signal.signal(signum, self._receive) for signum in handled}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
