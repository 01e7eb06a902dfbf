"""`mnist-job sweep run|trial|report`: parses and calls job/sweep*.py.

Registered on the `mnist-job` group by job/cli.py. Like it, nothing here
imports TensorFlow: a bad spec is one line and exit 2 at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from job.errors import JobError
from job.options import LOCATION, option

log = logging.getLogger("job")

SWEEP_EXIT_CODES = """
\b
Exit codes of `sweep run`:
  0    every trial finished
  1    at least one trial failed (the others ran to the end); report.md
       gives each failed trial's exit code and error; a rerun retries them
  2    the spec is invalid, or --output-dir holds another sweep
  130  Ctrl-C, 143 SIGTERM: the running trials checkpointed; rerun to resume
`sweep trial` exits as `train` does (mnist-job --help).
"""

spec_argument = click.argument("spec", type=click.Path(path_type=Path, dir_okay=False))
output_dir_option = option(
    "--output-dir",
    type=LOCATION,
    required=True,
    help="The sweep dir: sweep.json, trial-<i>/ per trial, the report.",
    show_default=False,
)


@click.group(epilog=SWEEP_EXIT_CODES)
def sweep() -> None:
    """Hyperparameter sweeps: trials of `train` with the settings a spec varies.

    \b
      mnist-job sweep run docs/sweep-example.json --output-dir sweep --parallel 2
      mnist-job sweep report sweep        # report.md, report.json, report.png
      mnist-job tensorboard --logdir sweep   # every trial a run; the HParams tab
    """


@sweep.command(epilog=SWEEP_EXIT_CODES)
@spec_argument
@output_dir_option
@option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    help="Trials at once on this machine; the CPUs are divided between them.",
)
def run(spec: Path, output_dir: Path, parallel: int) -> None:
    """Run every trial not yet finished, then write and print the report.

    Each trial runs as `sweep trial` in a process of its own, logging to
    <output-dir>/trial-<i>.log. A rerun skips finished trials and resumes the
    others from their checkpoints.
    """
    from job import sweep as sweeps
    from job import sweep_report, sweep_run

    loaded = sweeps.load(spec)
    _configure_logging(1, "text")
    outcome = sweep_run.run_all(spec, loaded, output_dir, parallel)
    click.echo(sweep_report.write(output_dir))
    if outcome.failed:
        failed = ", ".join(f"trial {i} (exit {code})" for i, code in sorted(outcome.failed.items()))
        raise JobError(
            f"{len(outcome.failed)} of {len(loaded.trials)} trials failed: {failed}; "
            f"see {output_dir / 'report.md'} and the trials' logs"
        )


@sweep.command(epilog=SWEEP_EXIT_CODES)
@spec_argument
@output_dir_option
@option(
    "--index",
    type=click.IntRange(min=0),
    # An Indexed Job's pod has JOB_COMPLETION_INDEX: its own trial.
    envvar=["MNIST_JOB_INDEX", "JOB_COMPLETION_INDEX"],
    required=True,
    show_default=False,
    help="The trial to run (0-based); an Indexed Job's pod has its own.",
)
def trial(spec: Path, output_dir: Path | str, index: int) -> None:
    """Run one trial into <output-dir>/trial-<index>, here; what each pod of
    k8s/sweep.yaml runs. A finished trial is not run again; an unfinished one
    resumes from its checkpoint.

    The trial's final metrics go to stdout as name=value lines (the format of
    Katib's and Kubeflow Trainer's stdout metrics collectors); logs go to stderr.
    """
    from job import sweep as sweeps
    from job import sweep_run

    loaded = sweeps.load(spec)
    config = sweep_run.trial_config(loaded, index, output_dir)
    _configure_logging(config.verbosity, config.log_format)
    metrics = sweep_run.run_trial(loaded, index, output_dir, config)
    for name, value in metrics.items():
        click.echo(f"{name}={value:.6g}")


@sweep.command()
@click.argument("sweep_dir", metavar="DIR", type=LOCATION)
def report(sweep_dir: Path | str) -> None:
    """Rank the trials of a sweep dir (finished or not) and write report.md,
    report.json and report.png there; print the ranked table."""
    from job import sweep_report

    _configure_logging(1, "text")
    click.echo(sweep_report.write(sweep_dir))


def _configure_logging(verbosity: int, log_format: str) -> None:
    """As `train` sets logging up (job/cli.py; not imported from there, which
    imports this module): native log filter first, then ours on stderr."""
    from job import native_log
    from job.logs import configure

    native_log.start(verbosity, log_format)
    configure(verbosity, log_format)
    if verbosity < 2:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
