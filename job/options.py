"""The command line's options: their types, defaults, help and MNIST_JOB_*
variables. `job.cli` puts them on its commands.

Each option's default comes from `job.config.DEFAULTS`, so `--help` shows what
a run really uses.
"""

from __future__ import annotations

from pathlib import Path

import click

from job import storage
from job.config import (
    DEFAULTS,
    DEVICES,
    LOG_FORMATS,
    MAX_NUM_IMAGES,
    MAX_PORT,
    MAX_SEED,
    STRATEGIES,
)
from job.errors import ConfigError


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


class StepRange(click.ParamType):
    name = "FIRST,LAST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            first, last = (int(part) for part in str(value).split(","))
        except ValueError:
            first = last = 0
        if not 1 <= first <= last:
            self.fail(f"{value!r} is not FIRST,LAST with 1 <= FIRST <= LAST", param, ctx)
        return first, last


class DirectoryPath(click.Path):
    """A directory; an empty value is refused, where a plain Path would make it
    the working directory (and --overwrite would clear its checkpoints/)."""

    def __init__(self):
        super().__init__(path_type=Path, file_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; leave the option out for the default", param, ctx)
        return super().convert(value, param, ctx)


class Location(DirectoryPath):
    """A local directory, or a gs:// or s3:// URI (job/storage.py)."""

    name = "path or URI"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "://" in value:
            return uri(self, value, param, ctx)
        return super().convert(value, param, ctx)


class FileLocation(click.Path):
    """A local file or directory, or a gs:// or s3:// URI."""

    name = "path or URI"

    def __init__(self):
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "://" in value:
            return uri(self, value, param, ctx)
        return super().convert(value, param, ctx)


def uri(param_type: click.ParamType, value: str, param, ctx) -> str:
    try:
        return storage.location(value)
    except ConfigError as err:
        param_type.fail(str(err), param, ctx)


PATH = DirectoryPath()
LOCATION = Location()
POSITIVE = click.IntRange(min=1)

data_dir_option = option(
    "--data-dir",
    type=LOCATION,
    default=None,
    help=f"MNIST cache directory, or a gs:// or s3:// prefix. [default: {DEFAULTS.data_dir}]",
    show_default=False,
)

compile_cache_option = option(
    "--compile-cache",
    type=PATH,
    default=None,
    help="Keep XLA's compiled training step in this dir for later runs on this "
    "machine (~0.35 s each). [default: off]",
    show_default=False,
)


output_dir_option = option(
    "--output-dir",
    type=LOCATION,
    default=None,
    help="Where artifacts go: a dir, or a gs:// or s3:// prefix. [default: outputs]",
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
    type=FileLocation(),
    default=DEFAULTS.output_dir,
    help="A model.keras file, or an output dir of `mnist-job train` holding one; "
    "a path, or a gs:// or s3:// URI.",
)
json_option = option(
    "--json", "as_json", is_flag=True, help="Print JSON for machines.", show_default=False
)

# `train`'s options, in the order --help lists them.
TRAIN_OPTIONS = (
    option(
        "--epochs", type=POSITIVE, default=DEFAULTS.epochs, help="Passes over the training set."
    ),
    option(
        "--batch-size",
        type=POSITIVE,
        default=DEFAULTS.batch_size,
        help="Global batch size, split evenly across replicas.",
    ),
    option(
        "--learning-rate", type=float, default=DEFAULTS.learning_rate, help="Adam learning rate."
    ),
    option(
        "--hidden-units",
        type=HiddenUnits(),
        default=",".join(map(str, DEFAULTS.hidden_units)),
        help="Width of each hidden Dense layer.",
    ),
    option(
        "--seed",
        type=click.IntRange(0, MAX_SEED),
        default=DEFAULTS.seed,
        help="Seeds initialisation, shuffling and the choice of images in predictions.png.",
    ),
    option(
        "--deterministic/--no-deterministic",
        default=DEFAULTS.deterministic,
        help="Turn on TensorFlow op determinism (bit-identical reruns).",
    ),
    output_dir_option,
    data_dir_option,
    compile_cache_option,
    option(
        "--no-compile-cache",
        is_flag=True,
        default=False,
        help="Compile without the cache, and leave it alone (overrides --compile-cache "
        "and MNIST_JOB_COMPILE_CACHE).",
    ),
    option(
        "--max-train-samples",
        type=POSITIVE,
        default=None,
        help="Train on the first N images only (quick runs). [default: all 60000]",
        show_default=False,
    ),
    option(
        "--num-images",
        type=click.IntRange(0, MAX_NUM_IMAGES),
        default=DEFAULTS.num_images,
        help="Test images in predictions.png (0: no predictions.png).",
    ),
    option(
        "--overwrite/--no-overwrite",
        default=DEFAULTS.overwrite,
        help="Replace a finished run in the output dir, or start over from a checkpoint of "
        "other settings or a corrupt one. An unfinished run with the same settings is still "
        "resumed.",
    ),
    option(
        "--checkpoint-every",
        type=POSITIVE,
        default=None,
        help="Also checkpoint every N steps. [default: every epoch only]",
        show_default=False,
    ),
    option(
        "--profile-steps",
        type=StepRange(),
        default=None,
        help="Trace global steps FIRST to LAST with TensorFlow's profiler, for "
        "TensorBoard's Profile tab. [default: off]",
        show_default=False,
    ),
    option(
        "--strategy",
        type=click.Choice(STRATEGIES),
        default=DEFAULTS.strategy,
        help="tf.distribute strategy; auto: multi-worker if a cluster is configured, "
        "mirrored on several GPUs, one-device on one GPU, default on CPU.",
    ),
    option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, help="Where to train."),
    num_workers_option,
    worker_service_option,
    worker_port_option,
    option(
        "--join-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULTS.join_timeout,
        metavar="SECONDS",
        help="Multi-worker: exit 1 if the other workers have not all joined by then.",
    ),
    option(
        "--model-dir",
        type=LOCATION,
        default=None,
        help="model.keras and saved_model/ go here. "
        "[default: the output dir, or AIP_MODEL_DIR / SM_MODEL_DIR]",
        show_default=False,
    ),
    option(
        "--checkpoint-dir",
        type=LOCATION,
        default=None,
        help="Checkpoints go here. [default: <output-dir>/checkpoints, or AIP_CHECKPOINT_DIR]",
        show_default=False,
    ),
    option(
        "--tensorboard-dir",
        type=LOCATION,
        default=None,
        help="TensorBoard logs go here. "
        "[default: <output-dir>/tensorboard, or AIP_TENSORBOARD_LOG_DIR]",
        show_default=False,
    ),
    option(
        "--staging-dir",
        type=PATH,
        default=None,
        help="Where a run with gs:// or s3:// outputs writes them before uploading. "
        "[default: <temp dir>/mnist-job-staging]",
        show_default=False,
    ),
    option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default=DEFAULTS.log_format,
        help="auto: a progress bar on a terminal, plain lines otherwise; "
        "json: one object per line.",
    ),
    option("--verbose/--quiet", default=None, help="More or less logging.", show_default=False),
    option(
        "--mlflow-tracking-uri",
        envvar=["MNIST_JOB_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"],
        help="Track the run in MLflow: a server's URL, or sqlite:///PATH. [default: off]",
    ),
    option("--mlflow-experiment", default=DEFAULTS.mlflow_experiment, help="MLflow experiment."),
    option("--mlflow-model-name", help="Also register the model in MLflow under this name."),
    click.option("--model_dir", "sagemaker_model_dir", hidden=True, default=None),
)


def train_options(command):
    """Decorate `command` with every option of `train`."""
    for decorator in reversed(TRAIN_OPTIONS):
        command = decorator(command)
    return command
