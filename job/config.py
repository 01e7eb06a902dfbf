"""Every setting of a training run, with its default, in one typed place.

The defaults reproduce the seed script: the same MLP, Adam at 1e-3, 5 epochs of
batch 32, the test set as validation data. The CLI builds a `TrainConfig` with
`from_options`: flags and `MNIST_JOB_*` variables (read by click), then the
platform's variables (Vertex AI's AIP_*, SageMaker's SM_*), then the defaults.
Tests build one directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from job import storage
from job.errors import ConfigError

STRATEGIES = ("auto", "default", "one-device", "mirrored", "multi-worker")
DEVICES = ("auto", "cpu", "gpu")
LOG_FORMATS = ("auto", "text", "json")
# predictions.png lays panels out 10 to a row; past this it stops being a figure
# anyone reads (and its PNG grows past what TensorBoard's decoder accepts).
MAX_NUM_IMAGES = 100
MAX_SEED = 2**32 - 1  # numpy's seeds are unsigned 32-bit
MAX_PORT = 65535
# MNIST's images and classes, which the model is built for; here, not in
# job.data (which re-exports them), so that the layer check below can use them.
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10  # the digits 0-9
MODEL_FILENAME = "model.keras"  # in an output dir, and what `--model DIR` looks for
# Weights in one layer, at most: past this TensorFlow's int64 sizes overflow (a
# traceback); up to it, a layer too big for memory (2**58 float32 are 1 EB, past
# any address space) fails with one out-of-memory line.
MAX_LAYER_WEIGHTS = 2**58


def dense_layer_shapes(hidden_units: tuple[int, ...]) -> list[tuple[int, int]]:
    """(inputs, units) of each Dense layer of the model: pixels -> hidden -> classes."""
    return list(itertools.pairwise((math.prod(IMAGE_SHAPE), *hidden_units, NUM_CLASSES)))


def default_data_dir() -> Path:
    """The MNIST cache: $XDG_CACHE_HOME/mnist-job, else ~/.cache/mnist-job."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "mnist-job"


@dataclass(frozen=True)
class TrainConfig:
    # Model and optimisation: the seed's values.
    epochs: int = 5
    batch_size: int = 32  # global: split evenly across replicas
    learning_rate: float = 1e-3
    hidden_units: tuple[int, ...] = (128, 64)
    seed: int = 0
    deterministic: bool = False  # TensorFlow op determinism: bit-identical reruns

    # Data: a local dir, or a gs:// or s3:// prefix holding mnist.npz.
    data_dir: Path | str = field(default_factory=default_data_dir)
    max_train_samples: int | None = None  # None: all 60,000

    # Outputs: local dirs, or gs:// and s3:// URIs (job/mirror.py). Platform
    # conventions (Vertex AI, SageMaker) may redirect the model, checkpoints
    # and TensorBoard logs; None means "under output_dir".
    output_dir: Path | str = Path("outputs")
    model_dir: Path | str | None = None
    checkpoint_dir: Path | str | None = None
    tensorboard_dir: Path | str | None = None
    # Vertex AI imports a model dir whose top holds the SavedModel: there, not
    # in saved_model/ (set when AIP_MODEL_DIR gives the model dir).
    saved_model_at_top: bool = False
    # Where a run with bucket outputs writes them before uploading them;
    # None: under the system's temp dir.
    staging_dir: Path | None = None
    num_images: int = 5  # panels in predictions.png
    overwrite: bool = False  # replace a finished run in output_dir
    checkpoint_every: int | None = None  # steps; checkpoints also end every epoch
    # Global steps FIRST..LAST (1-based) traced by TensorFlow's profiler into
    # the TensorBoard dir (job/profiler.py); None: no profiling.
    profile_steps: tuple[int, int] | None = None

    # Where it runs.
    # XLA's compiled step, kept for later runs on one machine (job/compile_cache.py).
    # Off unless asked for: a pod or a fresh container always starts empty.
    compile_cache: Path | None = None
    strategy: str = "auto"
    device: str = "auto"
    num_workers: int = 1  # Kubernetes Indexed Job: derive the cluster from the pod
    worker_service: str | None = None  # headless Service naming the worker pods
    worker_port: int = 2222
    join_timeout: float = 600.0  # seconds a worker waits for all the others to join

    # Logging.
    verbosity: int = 1  # 0 quiet, 1 normal, 2 debug
    log_format: str = "auto"  # auto: progress bar on a terminal, lines otherwise

    # MLflow tracking (job/tracking.py): on when a tracking URI is given.
    mlflow_tracking_uri: str | None = None  # a server's URL or a store (sqlite:///PATH)
    mlflow_experiment: str = "mnist-job"
    mlflow_model_name: str | None = None  # registered model; None: logged, not registered

    def __post_init__(self) -> None:
        for name in LOCATIONS:  # gs:// and s3:// URIs as str, local paths as Path
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, storage.location(value))
        positive = {
            "epochs": self.epochs,
            "batch-size": self.batch_size,
            "max-train-samples": self.max_train_samples,
            "checkpoint-every": self.checkpoint_every,
            "num-workers": self.num_workers,
        }
        for option, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"--{option} must be at least 1, got {value}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(
                f"--learning-rate must be a positive finite number, got {self.learning_rate}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= self.worker_port <= MAX_PORT:
            raise ConfigError(
                f"--worker-port must be between 1 and {MAX_PORT}, got {self.worker_port}"
            )
        if not (self.join_timeout > 0 and math.isfinite(self.join_timeout)):
            raise ConfigError(
                f"--join-timeout must be a positive number of seconds, got {self.join_timeout}"
            )
        if (
            self.profile_steps is not None
            and not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ConfigError(
                "--profile-steps must be FIRST,LAST with 1 <= FIRST <= LAST, "
                f"got {self.profile_steps}"
            )
        if not self.hidden_units or any(units < 1 for units in self.hidden_units):
            raise ConfigError(f"--hidden-units must be positive integers, got {self.hidden_units}")
        for inputs, units in dense_layer_shapes(self.hidden_units):
            if inputs * units > MAX_LAYER_WEIGHTS:
                raise ConfigError(
                    f"--hidden-units: a layer of {inputs} x {units} weights is more than "
                    f"TensorFlow can address (2**58)"
                )
        if not 0 <= self.num_images <= MAX_NUM_IMAGES:
            raise ConfigError(
                f"--num-images must be between 0 and {MAX_NUM_IMAGES}, got {self.num_images}"
            )
        for option, value in (
            ("mlflow-tracking-uri", self.mlflow_tracking_uri),
            ("mlflow-experiment", self.mlflow_experiment),
            ("mlflow-model-name", self.mlflow_model_name),
        ):
            if value is not None and not value.strip():
                raise ConfigError(f"--{option} must not be empty; leave it out for the default")
        for option, value, choices in (
            ("strategy", self.strategy, STRATEGIES),
            ("device", self.device, DEVICES),
            ("log-format", self.log_format, LOG_FORMATS),
        ):
            if value not in choices:
                raise ConfigError(f"--{option} must be one of {', '.join(choices)}, got {value!r}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready: paths as strings, tuples as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    # Derived locations: everything the chief writes lives under these.
    @property
    def model_path(self) -> Path:
        return (self.model_dir or self.output_dir) / MODEL_FILENAME

    @property
    def saved_model_path(self) -> Path:
        if self.saved_model_at_top and self.model_dir is not None:
            return self.model_dir
        return (self.model_dir or self.output_dir) / "saved_model"

    @property
    def checkpoint_path(self) -> Path:
        return (self.checkpoint_dir or self.output_dir / "checkpoints") / "latest.npz"

    @property
    def tensorboard_path(self) -> Path:
        return self.tensorboard_dir or self.output_dir / "tensorboard"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"


LOCATIONS = ("data_dir", "output_dir", "model_dir", "checkpoint_dir", "tensorboard_dir")
DEFAULTS = TrainConfig()


# Platform conventions (Vertex AI, SageMaker), used where no flag or MNIST_JOB_*
# variable sets the option (flag > MNIST_JOB_* > platform > default). Vertex
# AI gives gs:// URIs; SageMaker local paths it syncs with S3 itself.
PLATFORM_ENV = {
    "model_dir": ("AIP_MODEL_DIR", "SM_MODEL_DIR"),
    "checkpoint_dir": ("AIP_CHECKPOINT_DIR",),
    "tensorboard_dir": ("AIP_TENSORBOARD_LOG_DIR",),
    "output_dir": ("SM_OUTPUT_DATA_DIR",),
    "data_dir": ("SM_CHANNEL_TRAINING",),
}


SAGEMAKER_CHECKPOINT_DIR = Path("/opt/ml/checkpoints")


def from_options(options: dict, environ=os.environ) -> TrainConfig:
    """The TrainConfig of a command's options (None where not given; click has
    already read flags and MNIST_JOB_* variables) and the platform's variables."""
    options = apply_platform_env(options, environ)
    if options.pop("no_compile_cache", False):
        options["compile_cache"] = None
    return TrainConfig(**options)


def apply_platform_env(options: dict, environ=os.environ) -> dict:
    """`options` with the platform's variables filled in where an option is
    None, and the options still None left out (their defaults apply)."""
    options = dict(options)
    for name, variables in PLATFORM_ENV.items():
        if options.get(name) is not None:
            continue
        for variable in variables:
            if value := environ.get(variable, ""):
                options[name] = storage.location(value)
                if variable == "AIP_MODEL_DIR":
                    options.setdefault("saved_model_at_top", True)
                break
    if options.get("checkpoint_dir") is None and environ.get("SM_MODEL_DIR"):
        # SageMaker syncs this dir with the job's checkpoint S3 URI and
        # restores it into a replacement (spot) instance.
        options["checkpoint_dir"] = SAGEMAKER_CHECKPOINT_DIR
    return {name: value for name, value in options.items() if value is not None}


def resolve_data_dir(data_dir: Path | None, environ=os.environ) -> Path:
    """--data-dir or MNIST_JOB_DATA_DIR, else SageMaker's channel, else the
    default: every command that reads MNIST finds it where `train` does."""
    return apply_platform_env({"data_dir": data_dir}, environ).get("data_dir", DEFAULTS.data_dir)
