"""The `mnist-job` command: parses options into a TrainConfig and calls run().

Nothing here imports TensorFlow, so `--help` and bad options answer at once.
Every option can also come from the environment as MNIST_JOB_<OPTION>
(job/options.py declares them); job/config.py turns them into a TrainConfig.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from job import __version__
from job.config import from_options, resolve_data_dir
from job.errors import EXIT_CODES_HELP, DataError, ExitCode, JobError
from job.export_cli import export
from job.options import (
    LOCATION,
    PATH,
    compile_cache_option,
    data_dir_option,
    json_option,
    model_option,
    num_workers_option,
    option,
    output_dir_option,
    train_options,
    worker_port_option,
    worker_service_option,
)
from job.sweep_cli import sweep

log = logging.getLogger("job")


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="mnist-job")
def cli() -> None:
    """Train the seed's MNIST classifier and write the model, TensorBoard logs,
    a predictions PNG and metrics.json to an output directory.

    \b
    Quick start:
      mnist-job train                       # the seed's 5 epochs, outputs/ here
      mnist-job train --epochs 1 --max-train-samples 2000 --output-dir /tmp/run
      mnist-job predict --model outputs my_digit.jpg
      mnist-job evaluate --model outputs    # confusion matrix, gallery of mistakes
      mnist-job info                        # what the job sees here (pods, GPUs)
    """
    from job.heap import return_large_blocks_when_freed
    from job.lean_imports import keep_out_of_keras

    # Before any command loads TensorFlow.
    keep_out_of_keras()
    return_large_blocks_when_freed()


@cli.command(epilog=EXIT_CODES_HELP)
@train_options
def train(verbose, sagemaker_model_dir, **options) -> None:
    """Train the model and write every artifact to the output dir.

    Rerunning the same command on the same output dir resumes from the last
    checkpoint; a finished run is left alone unless --overwrite.
    """
    verbosity = {None: 1, False: 0, True: 2}[verbose]
    config = from_options({**options, "verbosity": verbosity}, os.environ)
    _configure_logging(config.verbosity, config.log_format)
    if sagemaker_model_dir:
        # SageMaker's TensorFlow estimator always passes this (an S3 URI).
        log.info("Ignoring --model_dir %s (SageMaker's; use SM_MODEL_DIR)", sagemaker_model_dir)
    from job.runner import run

    if run(config).workers == 1:
        _exit_without_teardown()


@cli.command(epilog=EXIT_CODES_HELP)
@model_option
@json_option
@option(
    "--save-preprocessed",
    type=PATH,
    default=None,
    help="Also write the 28x28 images the model saw, as PNGs, to this dir.",
    show_default=False,
)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def predict(model: Path | str, as_json: bool, save_preprocessed: Path | None, images) -> None:
    """Classify handwritten digits in image files, one digit per image.

    PNG, JPEG, BMP, GIF, TIFF or WebP of any size, grey or colour, dark ink on
    light paper or light on dark, the digit anywhere: each image is prepared as
    MNIST was (white on black, cropped to the ink, scaled into 20x20, centred
    by mass in 28x28). Prints one line per file: digit, probability, top 3.
    Control characters in file names are shown escaped (\\n); --json has the
    names as they are.

    A file that cannot be read, or is in another format, gets a one-line
    error; the others are still classified, and the exit code is then 3.
    """
    from contextlib import nullcontext

    from job import artifacts, collector, dirlock
    from job.inputs import load_model
    from job.predict import BadImage, predict_files, printable

    _configure_logging(1, "text")
    holding = nullcontext()
    if save_preprocessed is not None:
        artifacts.ensure_writable_dir(save_preprocessed, "--save-preprocessed dir")
        # Not into a dir a training run holds: its files could share names.
        holding = dirlock.held(save_preprocessed, "--save-preprocessed dir")
    with holding, collector.paused():
        results = predict_files(load_model(model), list(images), save_preprocessed)
    failed = [r for r in results if isinstance(r, BadImage)]
    for result in failed:
        click.echo(f"mnist-job: error: {printable(str(result))}", err=True)
    if as_json:
        entries = [
            {"file": str(path), "error": str(r).removeprefix(f"{path}: ")}
            if isinstance(r, BadImage)
            else r.to_dict()
            for path, r in zip(images, results, strict=True)
        ]
        click.echo(json.dumps(entries, indent=2))
    else:
        for result in results:
            if not isinstance(result, BadImage):
                click.echo(result.line())
    if failed and len(results) == 1:
        # Its error line says it all; "1 of 1 images could not be read" would
        # only repeat it.
        click.get_current_context().exit(ExitCode.DATA)
    if failed:
        raise DataError(f"{len(failed)} of {len(results)} images could not be read")


@cli.command(epilog=EXIT_CODES_HELP)
@model_option
@data_dir_option
@option(
    "--output-dir",
    type=LOCATION,
    default=None,
    help="Where confusion_matrix.png and misclassified.png go (a dir, gs:// or s3://). "
    "[default: the model's dir]",
    show_default=False,
)
@json_option
def evaluate(
    model: Path | str, data_dir: Path | str | None, output_dir: Path | str | None, as_json: bool
) -> None:
    """Test-set loss and accuracy, per-digit precision and recall, and two
    figures: confusion_matrix.png and misclassified.png (the most confident
    mistakes, with true digit, prediction and probability)."""
    from job import collector
    from job.inputs import model_location, parent

    _configure_logging(1, "text")
    from job.evaluate import evaluate as evaluate_model

    model = model_location(model)
    with collector.paused():
        report, paths = evaluate_model(
            model, resolve_data_dir(data_dir, os.environ), output_dir or parent(model)
        )
    if as_json:
        result = {"model": str(model), **report.to_dict()}
        result["figures"] = {name: str(path) for name, path in paths.items()}
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(report.text())
        click.echo("figures: " + ", ".join(str(p) for p in paths.values()))


@cli.command(epilog=EXIT_CODES_HELP)
@output_dir_option
@data_dir_option
@compile_cache_option
@num_workers_option
@worker_service_option
@worker_port_option
@json_option
def info(as_json: bool, **options) -> None:
    """What the job sees here: versions, CPUs and cgroup limit, GPUs, the
    strategy `auto` would pick, the cluster from TF_CONFIG or the Indexed Job,
    the MNIST cache, the compile cache and whether the output dir is writable.
    Changes nothing."""
    from job import info as report

    _configure_logging(1, "text")
    config = from_options(options, os.environ)
    collected = report.collect(config)
    click.echo(report.to_json(collected) if as_json else report.text(collected))


@cli.command(epilog=EXIT_CODES_HELP, context_settings={"ignore_unknown_options": True})
@option(
    "--logdir",
    type=LOCATION,
    default="outputs",
    help="A run's output dir or TensorBoard dir: a local dir, gs://bucket/path or s3://...",
)
@option("--host", default="localhost", help="Where to listen; 0.0.0.0: every interface.")
@option("--port", default=6006, type=click.IntRange(0, 65535), help="0: any free port.")
@click.argument("tensorboard_args", nargs=-1, type=click.UNPROCESSED)
def tensorboard(logdir: Path | str, host: str, port: int, tensorboard_args) -> None:
    """Serve TensorBoard on a run's logs, also from a bucket while it trains.

    Arguments after -- go to TensorBoard, e.g. -- --reload_interval 10.
    """
    from job.board import serve

    serve(logdir, host, port, tensorboard_args)


cli.add_command(export)
cli.add_command(sweep)


@cli.group()
def data() -> None:
    """Fill or check the MNIST cache, e.g. before going offline."""


@data.command()
@data_dir_option
def fetch(data_dir: Path | str | None) -> None:
    """Download MNIST into the cache and verify its checksums."""
    from job.inputs import fetch_data as fetch_mnist

    _configure_logging(1, "text")
    click.echo(fetch_mnist(resolve_data_dir(data_dir, os.environ)))


@data.command()
@data_dir_option
def verify(data_dir: Path | str | None) -> None:
    """Check the cached MNIST file (exit 3 if missing or corrupt); never downloads."""
    from job.inputs import verify_data as verify_mnist

    _configure_logging(1, "text")
    click.echo(f"{verify_mnist(resolve_data_dir(data_dir, os.environ))}: OK")


def _configure_logging(verbosity: int, log_format: str) -> None:
    from job import native_log
    from job.logs import configure

    # Before TensorFlow loads, so that its C++ lines are filtered from the first.
    native_log.start(verbosity, log_format)
    configure(verbosity, log_format)
    if verbosity >= 2:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # the flag says all, whatever is inherited
    else:
        # TensorFlow's C++ start-up chatter (CPU features, XLA's service) is
        # noise here; native_log hides the lines that ignore this (2.21).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _exit_without_teardown() -> None:
    """Exit 0 now, skipping the interpreter's teardown of TensorFlow: 0.7 s of
    destructors on a 7 s run. Safe because every artifact is already written
    and closed: what is left to flush is the kernel's, not this process's.
    Multi-worker runs exit normally instead, so that TensorFlow's coordination
    service between the workers shuts down in order."""
    from job import native_log

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    native_log.stop()  # os._exit skips atexit: TensorFlow's last lines first
    os._exit(ExitCode.OK)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; expected failures print one line and exit with their code
    (a JSON record when the log is JSON: every stderr line then parses)."""
    from job.logs import print_error

    try:
        code = cli.main(args=argv, prog_name="mnist-job", standalone_mode=False)
    except click.exceptions.Abort:
        print_error("mnist-job: interrupted; rerun train to resume from its checkpoint")
        code = ExitCode.INTERRUPTED
    except click.ClickException as err:
        print_error(f"mnist-job: error: {err.format_message()}")
        code = ExitCode.USAGE
    except JobError as err:
        print_error(f"mnist-job: error: {err}")
        code = err.exit_code
    except Exception as err:
        print_error(None, err)
        code = ExitCode.FAILURE
    sys.exit(int(code or 0))
