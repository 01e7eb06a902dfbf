"""`mnist-job export`: a trained model as a SavedModel, an ONNX file or a LiteRT
(.tflite) file, each run by its own runtime before it appears at its path.

Keras 3 writes all three (`model.export(format=...)`; ONNX through tf2onnx).
The contract is the SavedModel's that `train` writes: float32 `[batch, 28, 28]`
in [0, 1] -> `[batch, 10]` probabilities, any batch size. An export is written
to a temporary name beside its target (job/artifacts.py), loaded by the
runtime a user would serve it with (ONNX Runtime, the LiteRT interpreter,
`tf.saved_model.load`), and renamed into place only if that runtime's
predictions on a fixed batch match Keras' within TOLERANCE. Otherwise exit 1,
and nothing is left at the target.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import artifacts, errors, storage
from job.config import IMAGE_SHAPE, NUM_CLASSES
from job.errors import ConfigError, JobError

# What each format is written as, next to the model unless --output says where.
DEFAULT_NAMES = {"saved_model": "saved_model", "onnx": "model.onnx", "litert": "model.tflite"}
FORMATS = tuple(DEFAULT_NAMES)
# TF Serving's model base path (versions in it) beside the model, for --version.
SERVING_BASE = "serving"
# The modules each format's export and verification import, and the package
# that has each (the `export` extra).
NEEDS = {
    "saved_model": {},
    "onnx": {"tf2onnx": "tf2onnx", "onnx": "onnx", "onnxruntime": "onnxruntime"},
    "litert": {"ai_edge_litert": "ai-edge-litert"},
}
# The runtime that verifies each format: its module, and the name it is shown by.
RUNTIMES = {"saved_model": "tensorflow", "onnx": "onnxruntime", "litert": "ai_edge_litert"}
# Largest absolute difference allowed between a runtime's probabilities and
# Keras'. All three run the same float32 graph; only the order of the sums in
# the matrix products differs (oneDNN, MLAS, XNNPACK): measured up to 3.5e-6.
# 1e-4 leaves room for other CPUs' kernels, and is far below what another
# model's file differs by (tests/test_export.py).
TOLERANCE = 1e-4
# ONNX opset: what tf2onnx 1.17 writes by default, pinned so that an upgrade
# of tf2onnx cannot change the files silently; ONNX Runtime 1.10+ runs it.
ONNX_OPSET = 15
VERIFY_IMAGES = 32


class VerificationFailed(JobError):
    """The runtime's predictions differ from Keras', or it cannot run the file
    at all: the file is not the model (a converter's or a runtime's bug, or a
    model whose outputs are not numbers). Exit 1, as any unexpected failure."""


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    seconds: float  # writing the export, verification excluded
    size_bytes: int
    max_abs_diff: float  # the runtime's largest difference from Keras

    def line(self) -> str:
        runtime = RUNTIMES[self.format]
        version = importlib.import_module(runtime).__version__
        return (
            f"{self.path}: {self.format}, {self.size_bytes / 1e6:.2f} MB, written in "
            f"{self.seconds:.1f} s; {runtime} {version} matches "
            f"Keras on {VERIFY_IMAGES} images (max abs diff {self.max_abs_diff:.1e}, "
            f"tolerance {TOLERANCE:.0e})"
        )


def target_path(
    model: Path | str, fmt: str, output: Path | str | None = None, version: int | None = None
) -> Path:
    """Where the export goes: `output` (for a file format, an existing dir
    there gets the default name inside it), or the default name beside the
    model; with `version`, TF Serving's `<base>/<version>/`, where the base
    is `output` or `serving/` beside the model."""
    if version is not None and fmt != "saved_model":
        raise ConfigError("--version applies to --format saved_model only")
    if storage.is_uri(output):
        # Verified on disk first anyway; a bucket copy of a SavedModel dir
        # would be many objects, visible to TF Serving before they all are.
        raise ConfigError(f"--output {output}: exports are written to a local path")
    if output is None:
        if storage.is_uri(model):
            raise ConfigError(f"the model is in a bucket ({model}): pass --output, a local path")
        name = DEFAULT_NAMES[fmt] if version is None else SERVING_BASE
        output = Path(model).parent / name
    output = Path(output)
    if version is not None:
        return output / str(version)
    if fmt != "saved_model" and output.is_dir():
        output = output / DEFAULT_NAMES[fmt]
    return output


def check_target(target: Path, fmt: str, versioned: bool) -> None:
    """Refuse what the export must not replace: a TF Serving version (TF
    Serving loads each version once, so one rewritten in place would not be
    served), or a file or dir that is not an export of this format."""
    if versioned and target.exists():
        taken = [int(p.name) for p in target.parent.iterdir() if p.name.isdigit()]
        raise ConfigError(
            f"version {target.name} exists at {target}: versions are not replaced; "
            f"pass --version {max(taken, default=0) + 1} or higher"
        )
    if fmt == "saved_model" and target.exists() and not (target / "saved_model.pb").is_file():
        raise ConfigError(f"{target} exists and is not a SavedModel: not replaced")
    if fmt == "litert" and target.suffix != ".tflite":
        raise ConfigError(f"--output {target}: a LiteRT file's name must end in .tflite")
    missing = [pkg for mod, pkg in NEEDS[fmt].items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(
            f"--format {fmt} needs {', '.join(missing)}: pip install 'mnist-job[export]'"
        )
    artifacts.ensure_writable_dir(target.parent, "--output dir")


def export(
    model: Path | str, fmt: str, output: Path | str | None = None, version: int | None = None
) -> Exported:
    """Export the model at `model` (a model.keras file, an output dir holding
    one, or a gs:// / s3:// URI) as `fmt`; see target_path for where."""
    from job.inputs import load_model, model_location

    model = model_location(model)
    target = target_path(model, fmt, output, version)
    check_target(target, fmt, versioned=version is not None)
    keras_model = load_model(model)
    images = verification_images()
    # Before writing: Keras exports ONNX only from a model that has been called.
    expected = np.asarray(keras_model(images, training=False))
    with errors.explained(), artifacts.atomic_path(target) as tmp:
        start = time.perf_counter()
        write(keras_model, fmt, tmp)
        seconds = time.perf_counter() - start
        diff = verify(fmt, tmp, images, expected)
        size = _size(tmp)
    return Exported(target, fmt, seconds, size, diff)


def write(keras_model, fmt: str, path: Path) -> None:
    """Keras' own export of `fmt` to `path`; a converter's failure is exit 1."""
    import tensorflow as tf

    # tf2onnx logs each pass of its optimizer at INFO.
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Keras' tf2onnx patch for numpy 2 probes np.object (FutureWarning).
            warnings.simplefilter("ignore", FutureWarning)
            if fmt == "saved_model":
                keras_model.export(path, format="tf_saved_model", verbose=False)
            elif fmt == "onnx":
                keras_model.export(path, format="onnx", verbose=False, opset_version=ONNX_OPSET)
            else:
                # Builtin ops only: Keras would also allow TensorFlow ops
                # (Flex), which the plain LiteRT runtime on a phone lacks.
                builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
                keras_model.export(
                    str(path),
                    format="litert",
                    verbose=False,
                    target_spec={"supported_ops": builtins},
                )
    except Exception as err:
        if errors.explain(err) is not None:
            raise  # a full or read-only volume: errors.explained makes it exit 2
        raise JobError(f"exporting to {fmt} failed: {_first_line(err)}") from err


def verify(fmt: str, path: Path, images: np.ndarray, expected: np.ndarray) -> float:
    """Run the export at `path` in its runtime on `images`, as one batch and as
    a batch of one (the batch dimension must stay dynamic), and compare with
    Keras' `expected`: the largest absolute difference, or VerificationFailed."""
    try:
        predict = predictor(fmt, path)
        batch, single = predict(images), predict(images[:1])
    except Exception as err:  # each runtime raises its own types
        raise VerificationFailed(
            f"{RUNTIMES[fmt]} cannot run the {fmt} export: {_first_line(err)}; nothing written"
        ) from err
    if batch.shape != expected.shape or single.shape != expected[:1].shape:
        raise VerificationFailed(
            f"{RUNTIMES[fmt]} returns shapes {batch.shape} and {single.shape} for batches "
            f"of {len(images)} and 1, not [batch, {NUM_CLASSES}]; nothing written"
        )
    diff = float(max(np.abs(batch - expected).max(), np.abs(single - expected[:1]).max()))
    if not diff <= TOLERANCE:  # also when a difference is NaN
        by = "NaN (outputs that are not numbers)" if np.isnan(diff) else f"up to {diff:.2g}"
        raise VerificationFailed(
            f"{RUNTIMES[fmt]}'s predictions differ from Keras' by {by} "
            f"(tolerance {TOLERANCE:.0e}); nothing written"
        )
    return diff


def predictor(fmt: str, path: Path):
    """A function from float32 images [n, 28, 28] to probabilities [n, 10],
    run by the format's runtime, without Keras."""
    if fmt == "onnx":
        import onnx
        import onnxruntime

        onnx.checker.check_model(str(path), full_check=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        # The signature runner resizes the input to each batch it is given.
        runner = Interpreter(model_path=str(path)).get_signature_runner()
        (name,) = runner.get_input_details()
        return lambda x: _only(runner(**{name: x}))
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    return lambda x: _only(serve(**{name: tf.constant(x)})).numpy()


def verification_images(count: int = VERIFY_IMAGES, seed: int = 0) -> np.ndarray:
    """A fixed float32 batch in [0, 1]: ink-like strokes on black as in MNIST
    (most pixels 0, a few near 1), pixel noise, and an all-black and an
    all-white image. Synthetic, so that export needs no data set."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, *IMAGE_SHAPE), np.float32)
    half = count // 2
    for image in images[:half]:
        top, left = rng.integers(4, 12, 2)
        box = image[top : top + 14, left : left + 14]
        box[...] = (rng.random(box.shape) < 0.3) * rng.uniform(0.5, 1.0, box.shape)
    images[half:-2] = rng.random((count - half - 2, *IMAGE_SHAPE))
    images[-1] = 1.0
    return images


def _only(outputs: dict):
    (value,) = outputs.values()
    return value


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
