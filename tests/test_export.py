"""job/export.py: each format written from a trained model and run by its own
runtime as a user would, TF Serving's version layout, a model in a bucket, and
verification refusing a file that is not the model. The command's exit codes
and messages: test_export_cli.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from job import export, storage
from job.errors import ConfigError, ExitCode
from tests.conftest import run_job

FORMATS = export.FORMATS


def run_in_runtime(fmt: str, path, images: np.ndarray) -> np.ndarray:
    """The export's probabilities as its users get them: the few lines of
    docs/export.md, with each format's own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images})[0]
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(path)).get_signature_runner()
        return runner(image=images)["output_0"]
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(image=tf.constant(images))["output_0"].numpy()


@pytest.fixture(scope="module")
def model(finished_run, tmp_path_factory):
    """A copy of the finished tiny run's model.keras, so that exports beside it
    leave the shared run's dir as it was."""
    config, _ = finished_run
    path = tmp_path_factory.mktemp("model") / "model.keras"
    shutil.copy(config.model_path, path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_runs_in_its_runtime_as_keras_does(model, finished_run, tiny, tmp_path, fmt):
    _, result = finished_run
    target = tmp_path / "exports" / export.DEFAULT_NAMES[fmt]
    exported = export.export(model, fmt, output=target)

    assert exported.path == target and target.exists()
    assert exported.max_abs_diff <= export.TOLERANCE
    assert list((tmp_path / "exports").iterdir()) == [target]  # no temporaries left
    images = tiny.x_test.astype(np.float32) / 255.0
    keras_probabilities = np.asarray(result.model(images, training=False))
    for batch in (images, images[:1], images[:7]):  # the batch size is free
        probabilities = run_in_runtime(fmt, target, batch)
        assert probabilities.shape == (len(batch), 10)
        np.testing.assert_allclose(probabilities, keras_probabilities[: len(batch)], atol=1e-4)
    accuracy = (run_in_runtime(fmt, target, images).argmax(1) == tiny.y_test).mean()
    assert accuracy == (keras_probabilities.argmax(1) == tiny.y_test).mean()


def test_versions_for_tf_serving_are_added_never_replaced(model, tmp_path):
    base = tmp_path / "models" / "mnist"
    first = export.export(model, "saved_model", output=base, version=1)
    assert first.path == base / "1" and (base / "1" / "saved_model.pb").is_file()
    export.export(model, "saved_model", output=base, version=2)
    written = (base / "1" / "saved_model.pb").stat().st_mtime_ns

    with pytest.raises(ConfigError, match="pass --version 3 or higher"):
        export.export(model, "saved_model", output=base, version=1)
    assert (base / "1" / "saved_model.pb").stat().st_mtime_ns == written
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    # Without --output, the base is serving/ beside the model.
    assert export.target_path(model, "saved_model", None, 4) == model.parent / "serving" / "4"


def test_an_export_that_does_not_match_keras_fails_and_is_not_written(model, tmp_path):
    """verify() on a file that another model wrote: what a converter bug that
    changed the model would produce."""
    import keras

    from job.model import build_model

    images = export.verification_images()
    other_model = build_model()
    other_model(images)  # Keras exports ONNX only from a model that has been called
    other = tmp_path / "other.onnx"
    other_model.export(other, format="onnx", verbose=False)
    expected = np.asarray(keras.saving.load_model(model, compile=False)(images))

    with pytest.raises(export.VerificationFailed, match="differ from Keras' by up to") as failed:
        export.verify("onnx", other, images, expected)
    assert failed.value.exit_code == ExitCode.FAILURE
    with pytest.raises(export.VerificationFailed, match="cannot run the litert export"):
        export.verify("litert", other, images, expected)  # not a .tflite inside


def test_a_model_in_a_bucket_is_exported_to_a_local_path(model, stores, tmp_path):
    run = stores["s3"].uri("export")
    storage.upload(model, f"{run}/model.keras")

    exported = export.export(run, "litert", output=tmp_path / "model.tflite")
    assert exported.path.is_file()
    with pytest.raises(ConfigError, match="the model is in a bucket"):
        export.export(run, "litert")  # nowhere beside it to write


@pytest.mark.slow
@pytest.mark.network
def test_every_export_of_a_full_mnist_model_keeps_its_accuracy(tmp_path):
    """The seed's defaults on real MNIST (fetched unless cached), then each
    export run by its runtime on the 10,000 test images."""
    from job.config import default_data_dir
    from job.data import load

    out = tmp_path / "out"
    result = run_job("train", "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, result.stderr
    mnist = load(default_data_dir())
    images = mnist.x_test.astype(np.float32) / 255.0
    for fmt in FORMATS:
        target = tmp_path / "exports" / export.DEFAULT_NAMES[fmt]
        result = run_job("export", "--model", str(out), "--format", fmt, "--output", str(target))
        assert result.returncode == 0, result.stderr
        accuracy = (run_in_runtime(fmt, target, images).argmax(1) == mnist.y_test).mean()
        assert accuracy >= 0.97, (fmt, accuracy)
