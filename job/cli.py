"""The `mnist-job` command: parses options into a TrainConfig and calls run().

Nothing here imports TensorFlow, so `--help` and bad options answer at once.
Every option can also come from the environment as MNIST_JOB_<OPTION>.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from job import __version__
from job.config import (
    DEFAULTS,
    DEVICES,
    LOG_FORMATS,
    MAX_NUM_IMAGES,
    MAX_PORT,
    MAX_SEED,
    STRATEGIES,
    TrainConfig,
)
from job.errors import DataError, ExitCode, JobError

log = logging.getLogger("job")

EXIT_CODES_HELP = """
\b
Exit codes:
  0    success
  1    unexpected failure (a bug, out of memory, a lost worker): worth a
       retry, which resumes from the last checkpoint
  2    usage or configuration error (bad option or environment, unusable
       output dir, finished run without --overwrite, checkpoint corrupt or
       made with other settings, output volume full or read-only, loss or
       weights diverged to NaN): fix the command or the volume
  3    MNIST unavailable or corrupt; predict: an image could not be read
  4    requested device unavailable (--device gpu without a GPU)
  130  interrupted (Ctrl-C): rerun to resume from the last checkpoint
  143  stopped by SIGTERM after writing a checkpoint: rerun to resume
"""

# Platform conventions, used where no flag or MNIST_JOB_* variable sets the
# option (flag > MNIST_JOB_* > platform > default). Only local paths count:
# a gs:// or s3:// URI is the platform's business, not a directory we can write.
PLATFORM_ENV = {
    "model_dir": ("AIP_MODEL_DIR", "SM_MODEL_DIR"),
    "checkpoint_dir": ("AIP_CHECKPOINT_DIR",),
    "tensorboard_dir": ("AIP_TENSORBOARD_LOG_DIR",),
    "output_dir": ("SM_OUTPUT_DATA_DIR",),
    "data_dir": ("SM_CHANNEL_TRAINING",),
}


def option(*decls: str, **kwargs):
    """click.option with the MNIST_JOB_<OPTION> variable and defaults shown."""
    name = decls[0].lstrip("-").split("/")[0]
    kwargs.setdefault("envvar", "MNIST_JOB_" + name.upper().replace("-", "_"))
    kwargs.setdefault("show_envvar", True)
    kwargs.setdefault("show_default", True)
    return click.option(*decls, **kwargs)


class HiddenUnits(click.ParamType):
    name = "UNITS,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            units = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            units = ()
        if not units or min(units) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers", param, ctx)
        return units


class DirectoryPath(click.Path):
    """A directory; an empty value is refused, where a plain Path would make it
    the working directory (and --overwrite would clear its checkpoints/)."""

    def __init__(self):
        super().__init__(path_type=Path, file_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; leave the option out for the default", param, ctx)
        return super().convert(value, param, ctx)


PATH = DirectoryPath()
POSITIVE = click.IntRange(min=1)

data_dir_option = option(
    "--data-dir",
    type=PATH,
    default=None,
    help=f"MNIST cache directory. [default: {DEFAULTS.data_dir}]",
    show_default=False,
)

compile_cache_option = option(
    "--compile-cache",
    type=PATH,
    default=None,
    help="Keep XLA's compiled training step here for later runs on this machine "
    f"(~0.35 s each). [default: {DEFAULTS.compile_cache}]",
    show_default=False,
)


output_dir_option = option(
    "--output-dir",
    type=PATH,
    default=None,
    help="Where artifacts go. [default: outputs]",
    show_default=False,
)
num_workers_option = option(
    "--num-workers",
    type=POSITIVE,
    default=DEFAULTS.num_workers,
    help="Workers of a Kubernetes Indexed Job (cluster derived from the pod).",
)
worker_service_option = option(
    "--worker-service",
    default=None,
    help="Headless Service (the pods' subdomain) of an Indexed Job's workers.",
)
worker_port_option = option(
    "--worker-port",
    type=click.IntRange(1, MAX_PORT),
    default=DEFAULTS.worker_port,
    help="Workers' gRPC port.",
)
model_option = option(
    "--model",
    type=click.Path(path_type=Path),
    default=DEFAULTS.output_dir,
    help="A model.keras file, or an output dir of `mnist-job train` holding one.",
)
json_option = option(
    "--json", "as_json", is_flag=True, help="Print JSON for machines.", show_default=False
)


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


@cli.command(epilog=EXIT_CODES_HELP)
@option("--epochs", type=POSITIVE, default=DEFAULTS.epochs, help="Passes over the training set.")
@option(
    "--batch-size",
    type=POSITIVE,
    default=DEFAULTS.batch_size,
    help="Global batch size, split evenly across replicas.",
)
@option("--learning-rate", type=float, default=DEFAULTS.learning_rate, help="Adam learning rate.")
@option(
    "--hidden-units",
    type=HiddenUnits(),
    default=",".join(map(str, DEFAULTS.hidden_units)),
    help="Width of each hidden Dense layer.",
)
@option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=DEFAULTS.seed,
    help="Seeds initialisation, shuffling and the choice of images in predictions.png.",
)
@option(
    "--deterministic/--no-deterministic",
    default=DEFAULTS.deterministic,
    help="Turn on TensorFlow op determinism (bit-identical reruns).",
)
@output_dir_option
@data_dir_option
@compile_cache_option
@option(
    "--no-compile-cache",
    is_flag=True,
    default=False,
    help="Compile without the cache, and leave it alone.",
)
@option(
    "--max-train-samples",
    type=POSITIVE,
    default=None,
    help="Train on the first N images only (quick runs). [default: all 60000]",
    show_default=False,
)
@option(
    "--num-images",
    type=click.IntRange(0, MAX_NUM_IMAGES),
    default=DEFAULTS.num_images,
    help="Test images in predictions.png (0: no predictions.png).",
)
@option(
    "--overwrite/--no-overwrite",
    default=DEFAULTS.overwrite,
    help="Replace a finished run in the output dir, or start over from a checkpoint of "
    "other settings or a corrupt one. An unfinished run with the same settings is still "
    "resumed.",
)
@option(
    "--checkpoint-every",
    type=POSITIVE,
    default=None,
    help="Also checkpoint every N steps. [default: every epoch only]",
    show_default=False,
)
@option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=DEFAULTS.strategy,
    help="tf.distribute strategy; auto: multi-worker if a cluster is configured, "
    "mirrored on several GPUs, one-device on one GPU, default on CPU.",
)
@option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, help="Where to train.")
@num_workers_option
@worker_service_option
@worker_port_option
@option(
    "--model-dir",
    type=PATH,
    default=None,
    help="model.keras and saved_model/ go here. "
    "[default: the output dir, or AIP_MODEL_DIR / SM_MODEL_DIR]",
    show_default=False,
)
@option(
    "--checkpoint-dir",
    type=PATH,
    default=None,
    help="Checkpoints go here. [default: <output-dir>/checkpoints, or AIP_CHECKPOINT_DIR]",
    show_default=False,
)
@option(
    "--tensorboard-dir",
    type=PATH,
    default=None,
    help="TensorBoard logs go here. "
    "[default: <output-dir>/tensorboard, or AIP_TENSORBOARD_LOG_DIR]",
    show_default=False,
)
@option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=DEFAULTS.log_format,
    help="auto: a progress bar on a terminal, plain lines otherwise; json: one object per line.",
)
@option("--verbose/--quiet", default=None, help="More or less logging.", show_default=False)
@click.option("--model_dir", "sagemaker_model_dir", hidden=True, default=None)
def train(verbose, sagemaker_model_dir, **options) -> None:
    """Train the model and write every artifact to the output dir.

    Rerunning the same command on the same output dir resumes from the last
    checkpoint; a finished run is left alone unless --overwrite.
    """
    options = _train_options(options, os.environ)
    verbosity = {None: 1, False: 0, True: 2}[verbose]
    config = TrainConfig(verbosity=verbosity, **options)
    _configure_logging(config.verbosity, config.log_format)
    if sagemaker_model_dir:
        # SageMaker's TensorFlow estimator always passes this (an S3 URI).
        log.info("Ignoring --model_dir %s (SageMaker's; use SM_MODEL_DIR)", sagemaker_model_dir)
    from job.runner import run

    result = run(config)
    if result.metrics["devices"]["workers"] == 1:
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
def predict(model: Path, as_json: bool, save_preprocessed: Path | None, images) -> None:
    """Classify handwritten digits in image files, one digit per image.

    PNG, JPEG or BMP of any size, grey or colour, dark ink on light paper or
    light on dark, the digit anywhere: each image is prepared as MNIST was
    (white on black, cropped to the ink, scaled into 20x20, centred by mass in
    28x28). Prints one line per file: digit, probability, top 3.

    A file that cannot be read gets a one-line error; the others are still
    classified, and the exit code is then 3.
    """
    from job import artifacts, collector
    from job.predict import BadImage, predict_files

    _configure_logging(1, "text")
    if save_preprocessed is not None:
        artifacts.ensure_writable_dir(save_preprocessed, "--save-preprocessed dir")
    with collector.paused():
        results = predict_files(artifacts.load_model(model), list(images), save_preprocessed)
    failed = [r for r in results if isinstance(r, BadImage)]
    for result in failed:
        click.echo(f"mnist-job: error: {result}", err=True)
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
    if failed:
        raise DataError(f"{len(failed)} of {len(results)} images could not be read")


@cli.command(epilog=EXIT_CODES_HELP)
@model_option
@data_dir_option
@option(
    "--output-dir",
    type=PATH,
    default=None,
    help="Where confusion_matrix.png and misclassified.png go. [default: the model's dir]",
    show_default=False,
)
@json_option
def evaluate(model: Path, data_dir: Path | None, output_dir: Path | None, as_json: bool) -> None:
    """Test-set loss and accuracy, per-digit precision and recall, and two
    figures: confusion_matrix.png and misclassified.png (the most confident
    mistakes, with true digit, prediction and probability)."""
    from job import collector
    from job.artifacts import model_file

    _configure_logging(1, "text")
    from job.evaluate import evaluate as evaluate_model

    with collector.paused():
        report, paths = evaluate_model(
            model, _data_dir(data_dir), output_dir or model_file(model).parent
        )
    if as_json:
        result = {"model": str(model_file(model)), **report.to_dict()}
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
    config = TrainConfig(**_apply_platform_env(options, os.environ))
    collected = report.collect(config)
    click.echo(report.to_json(collected) if as_json else report.text(collected))


@cli.group()
def data() -> None:
    """Fill or check the MNIST cache, e.g. before going offline."""


@data.command()
@data_dir_option
def fetch(data_dir: Path | None) -> None:
    """Download MNIST into the cache and verify its checksums."""
    from job.data import fetch as fetch_mnist

    _configure_logging(1, "text")
    click.echo(fetch_mnist(_data_dir(data_dir)))


@data.command()
@data_dir_option
def verify(data_dir: Path | None) -> None:
    """Check the cached MNIST file (exit 3 if missing or corrupt); never downloads."""
    from job.data import verify as verify_mnist

    _configure_logging(1, "text")
    click.echo(f"{verify_mnist(_data_dir(data_dir))}: OK")


def _train_options(options: dict, environ) -> dict:
    """TrainConfig's fields from `train`'s options."""
    options = _apply_platform_env(options, environ)
    if options.pop("no_compile_cache"):
        options["compile_cache"] = None
    return options


def _apply_platform_env(options: dict, environ) -> dict:
    options = dict(options)
    for name, variables in PLATFORM_ENV.items():
        if options.get(name) is not None:
            continue
        for variable in variables:
            value = environ.get(variable, "")
            if value and "://" not in value:
                options[name] = Path(value)
                break
    options = {name: value for name, value in options.items() if value is not None}
    return options


def _data_dir(data_dir: Path | None) -> Path:
    """--data-dir or MNIST_JOB_DATA_DIR, else SageMaker's channel, else the default:
    every command that reads MNIST finds it where `train` does."""
    options = _apply_platform_env({"data_dir": data_dir}, os.environ)
    return options.get("data_dir", DEFAULTS.data_dir)


def _configure_logging(verbosity: int, log_format: str) -> None:
    from job.logs import configure

    configure(verbosity, log_format)
    if verbosity < 2:
        # TensorFlow's C++ start-up chatter (CPU features, XLA's service) is
        # noise here. Its oneDNN notice is printed whatever this says (2.21).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _exit_without_teardown() -> None:
    """Exit 0 now, skipping the interpreter's teardown of TensorFlow: 0.7 s of
    destructors on a 7 s run. Safe because every artifact is already written
    and closed: what is left to flush is the kernel's, not this process's.
    Multi-worker runs exit normally instead, so that TensorFlow's coordination
    service between the workers shuts down in order."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(ExitCode.OK)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; expected failures print one line and exit with their code."""
    try:
        code = cli.main(args=argv, prog_name="mnist-job", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mnist-job: interrupted; rerun train to resume from its checkpoint", err=True)
        code = ExitCode.INTERRUPTED
    except click.ClickException as err:
        click.echo(f"mnist-job: error: {err.format_message()}", err=True)
        code = ExitCode.USAGE
    except JobError as err:
        click.echo(f"mnist-job: error: {err}", err=True)
        code = err.exit_code
    except Exception:
        traceback.print_exc()
        code = ExitCode.FAILURE
    sys.exit(int(code or 0))
