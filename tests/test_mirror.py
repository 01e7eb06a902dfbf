"""Runs whose outputs go to a bucket: the local S3 and GCS servers of
tests/stores.py, reached through the standard endpoint variables only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from job import storage
from job.config import TrainConfig
from job.errors import ConfigError, ExitCode, JobError
from job.mirror import Mirror
from job.runner import run
from scripts.multiworker import start_workers
from tests.conftest import ROOT, error_lines, run_tiny_job, start_tiny_job
from tests.stores import FlakyProxy

ARTIFACTS = (
    "metrics.json",
    "model.keras",
    "saved_model/saved_model.pb",
    "predictions.png",
    "confusion_matrix.png",
    "misclassified.png",
    "checkpoints/latest.npz",
)


def keys(uri: str) -> list[str]:
    fs = storage.filesystem(uri)
    fs.invalidate_cache()
    root = uri.split("://", 1)[1]
    return sorted(key[len(root) + 1 :] for key in fs.find(uri))


def wait_for(uri: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not storage.exists(uri):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{uri} did not appear"
        time.sleep(0.1)


def test_the_staging_dir_mirrors_only_the_bucket_dirs(tmp_path):
    config = TrainConfig(
        output_dir=tmp_path / "out", model_dir="gs://b/model", staging_dir=tmp_path
    )
    mirror = Mirror(config)
    assert mirror.local.output_dir == tmp_path / "out"
    assert mirror.local.model_dir.parent.parent == tmp_path
    assert mirror.remote(mirror.local.model_path) == "gs://b/model/model.keras"
    assert mirror.remote(mirror.local.checkpoint_path) is None
    assert Mirror(config, task="worker-1").local.model_dir != mirror.local.model_dir
    assert not Mirror(TrainConfig(output_dir=tmp_path)).active


def test_a_run_to_a_bucket_writes_every_artifact_loadable_from_there(store, tiny, tmp_path):
    uri = store.uri()
    config = TrainConfig(
        epochs=2, output_dir=uri, num_images=3, strategy="default", staging_dir=tmp_path
    )
    result = run(config, datasets=tiny)
    written = keys(uri)
    for name in ARTIFACTS:
        assert name in written, (name, written)
    assert any(key.startswith("tensorboard/train/events.out.tfevents") for key in written)
    assert not [key for key in written if "/." in f"/{key}"], "locks or temporaries left"

    metrics = json.loads(storage.read_bytes(f"{uri}/metrics.json"))
    assert metrics["config"]["output_dir"] == uri
    assert metrics["test"] == result.metrics["test"]
    assert storage.download(f"{uri}/model.keras", tmp_path / "model.keras")
    from job.model import load_model

    model = load_model(tmp_path / "model.keras")
    assert model.predict(tiny.x_test[:4] / 255.0, verbose=0).shape == (4, 10)

    with pytest.raises(ConfigError, match="holds a finished run"):
        run(config, datasets=tiny)
    again = run(config.replace(overwrite=True, epochs=1), datasets=tiny)
    assert len(json.loads(storage.read_bytes(f"{uri}/metrics.json"))["history"]) == 1
    assert again.metrics["resumed_from"] is None


def test_vertex_ai_variables_put_the_model_where_vertex_imports_it(stores, tmp_path):
    bucket = stores["gs"].bucket()
    env = {
        "AIP_MODEL_DIR": f"{bucket}/model/",
        "AIP_CHECKPOINT_DIR": f"{bucket}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{bucket}/logs/",
    }
    done = run_tiny_job("train", "--epochs", "1", "--output-dir", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    written = keys(bucket)
    assert "model/saved_model.pb" in written  # the SavedModel at the top
    assert "model/model.keras" in written
    assert "checkpoints/latest.npz" in written
    assert any(key.startswith("logs/train/events.out.tfevents") for key in written)
    assert (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_kill_9_then_a_rerun_elsewhere_resumes_from_the_bucket(store, tmp_path):
    uri = store.uri()
    args = ["train", "--output-dir", uri, "--epochs", "60", "--checkpoint-every", "5"]
    first = start_tiny_job(*args, "--staging-dir", str(tmp_path / "node-a"), env=store.env)
    wait_for(f"{uri}/checkpoints/latest.npz", first)
    time.sleep(1.0)
    first.kill()
    first.communicate()
    assert not storage.exists(f"{uri}/metrics.json")

    # Another node: an empty staging dir, only the bucket to resume from.
    rerun = run_tiny_job(*args, "--staging-dir", str(tmp_path / "node-b"), env=store.env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"Resuming from {uri}/checkpoints/latest.npz" in rerun.stderr
    metrics = json.loads(storage.read_bytes(f"{uri}/metrics.json"))
    assert metrics["resumed_from"] is not None
    assert [record["epoch"] for record in metrics["history"]] == list(range(1, 61))


@pytest.mark.slow
def test_sigterm_checkpoints_to_the_bucket_and_exits_143(store, tmp_path):
    uri = store.uri()
    args = ["train", "--output-dir", uri, "--epochs", "60", "--checkpoint-every", "5"]
    process = start_tiny_job(*args, "--staging-dir", str(tmp_path / "a"), env=store.env)
    wait_for(f"{uri}/checkpoints/latest.npz", process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == ExitCode.TERMINATED, stderr
    assert f"checkpoint saved in {uri}/checkpoints" in error_lines(stderr)[-1]
    # The bucket has the checkpoint of the step it stopped at.
    assert storage.download(f"{uri}/checkpoints/latest.npz", tmp_path / "latest.npz")
    from job import checkpoint

    stopped = checkpoint.load(tmp_path / "latest.npz")[2]
    assert f"at epoch {stopped.epoch + 1}, step {stopped.step}" in stderr


@pytest.mark.slow
def test_two_runs_on_one_prefix_cannot_both_train(store, tmp_path):
    uri = store.uri()
    args = ["train", "--output-dir", uri, "--epochs", "100000"]
    first = start_tiny_job(*args, "--staging-dir", str(tmp_path / "a"), env=store.env)
    try:
        wait_for(f"{uri}/.mnist-job.lock", first)
        second = run_tiny_job(*args, "--staging-dir", str(tmp_path / "b"), env=store.env)
        assert second.returncode == ExitCode.USAGE, second.stderr
        assert (
            error_lines(second.stderr)
            == [line for line in error_lines(second.stderr) if "is in use by process" in line]
            != []
        )
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.communicate()


def test_a_missing_bucket_is_one_line_and_exit_2(store, tmp_path):
    uri = f"{store.scheme}://no-such-bucket-anywhere/run"
    done = run_tiny_job("train", "--output-dir", uri, "--staging-dir", str(tmp_path), env=store.env)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert error_lines(done.stderr) == [
        f"mnist-job: error: {uri}: no such bucket, or no access to it"
    ], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_network_outage_mid_run_is_ridden_out(stores, tmp_path):
    s3 = stores["s3"]
    uri = s3.uri()
    proxy = FlakyProxy(s3.env["AWS_ENDPOINT_URL"])
    env = {**s3.env, "AWS_ENDPOINT_URL": proxy.url, "MNIST_JOB_STORAGE_RETRY_SECONDS": "60"}
    args = ["train", "--output-dir", uri, "--epochs", "40", "--checkpoint-every", "5"]
    process = start_tiny_job(*args, "--staging-dir", str(tmp_path), env=env)
    try:
        wait_for(f"{uri}/checkpoints/latest.npz", process)
        proxy.cut()
        time.sleep(20)
        proxy.restore()
        _, stderr = process.communicate(timeout=180)
    finally:
        proxy.close()
    assert process.returncode == 0, stderr
    # Ridden out by the clients' own retries and ours (job/storage.py), silently.
    assert "Traceback" not in stderr and "ERROR" not in stderr
    assert storage.exists(f"{uri}/metrics.json")


def test_a_failed_upload_mid_run_names_the_kept_checkpoint(tmp_path, monkeypatch):
    """Whichever upload meets an outage first, the logs' or the checkpoint's,
    the error says where the checkpoint a rerun resumes from is kept."""
    import s3fs

    mirror = Mirror(TrainConfig(output_dir="s3://no-store/run", staging_dir=tmp_path))
    events = mirror.local.tensorboard_path / "train" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"event")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "0")
    s3fs.S3FileSystem.clear_instance_cache()  # one that reads these variables
    try:
        with pytest.raises(JobError) as no_checkpoint:
            mirror.logs_written()
        mirror.local.checkpoint_path.parent.mkdir(parents=True)
        mirror.local.checkpoint_path.write_bytes(b"checkpoint")
        for upload in (mirror.logs_written, mirror.checkpoint_saved):
            with pytest.raises(JobError) as failed:
                upload()
            assert str(failed.value).startswith("could not upload to s3://no-store/run/")
            assert str(failed.value).endswith(
                f"; the checkpoint is kept in {mirror.local.checkpoint_path}"
            )
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "the checkpoint is kept" not in str(no_checkpoint.value)


@pytest.mark.slow
def test_a_lasting_outage_ends_with_exit_1_and_keeps_the_local_checkpoint(stores, tmp_path):
    s3 = stores["s3"]
    uri = s3.uri()
    proxy = FlakyProxy(s3.env["AWS_ENDPOINT_URL"])
    env = {**s3.env, "AWS_ENDPOINT_URL": proxy.url, "MNIST_JOB_STORAGE_RETRY_SECONDS": "3"}
    # TensorBoard's logs local: the checkpoint is then the only upload mid-run,
    # the one that meets the outage (the logs' own upload follows its event
    # writer's flushes, which come when they come).
    logs = str(tmp_path / "logs")
    args = ["train", "--output-dir", uri, "--tensorboard-dir", logs, "--epochs", "40",
            "--checkpoint-every", "5"]  # fmt: skip
    process = start_tiny_job(*args, "--staging-dir", str(tmp_path), env=env)
    try:
        wait_for(f"{uri}/checkpoints/latest.npz", process)
        proxy.cut()
        _, stderr = process.communicate(timeout=180)
    finally:
        proxy.close()
    assert process.returncode == ExitCode.FAILURE, stderr
    (line,) = error_lines(stderr)
    assert f"could not upload to {uri}/checkpoints/latest.npz after" in line
    assert "the checkpoint is kept in " in line
    kept = line.rsplit("the checkpoint is kept in ", 1)[1]
    assert kept.endswith("latest.npz") and (tmp_path / kept).exists()

    # Back online: a rerun on this node resumes from the later local checkpoint.
    rerun = run_tiny_job(*args, "--staging-dir", str(tmp_path), env=s3.env)
    assert rerun.returncode == 0, rerun.stderr
    assert "later than the bucket's" in rerun.stderr
    assert storage.exists(f"{uri}/metrics.json")


@pytest.mark.slow
def test_two_workers_with_a_bucket_resume_after_one_is_killed(stores, tmp_path):
    s3 = stores["s3"]
    uri = s3.uri()
    commands = [
        [sys.executable, str(ROOT / "tests" / "tiny_job.py"), "train", "--output-dir", uri,
         "--epochs", "100", "--checkpoint-every", "10",
         "--staging-dir", str(tmp_path / f"node-{index}")]
        for index in range(2)
    ]  # fmt: skip
    env = {**s3.env, "TINY_JOB_TRAIN": "960"}

    def start():
        return start_workers(commands, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    workers = start()
    wait_for(f"{uri}/checkpoints/latest.npz", workers[0])
    workers[1].kill()
    _, log = workers[0].communicate(timeout=120)
    workers[1].communicate()
    assert workers[0].returncode == ExitCode.FAILURE, log
    assert f"resume from the last checkpoint in {uri}/checkpoints" in log

    workers = start()
    logs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    assert all(f"Resuming from {uri}/checkpoints/latest.npz" in log for log in logs)
    metrics = json.loads(storage.read_bytes(f"{uri}/metrics.json"))
    assert metrics["devices"]["workers"] == 2
    assert [record["epoch"] for record in metrics["history"]] == list(range(1, 101))
