"""MLflow tracking of a run, where --mlflow-tracking-uri (or MLFLOW_TRACKING_URI)
names a tracking server or store; otherwise mlflow is never imported (~1 s).

The chief logs, in one MLflow run of experiment --mlflow-experiment: PARAMS
and the training images; each epoch's EPOCH_METRICS at step = epoch; the test
metrics and throughput; tags (versions, strategy, device, git commit); the
figures and metrics.json; the model, with its signature and an input example,
registered under --mlflow-model-name if given (docs/tracking.md).

The run id is kept in the checkpoint (TrainState.mlflow_run_id): a resumed run,
here or from a bucket elsewhere, continues the same MLflow run and logs the
epochs it lacks. Tracking never fails a run: its first failure is one warning,
nothing is sent after it, and one line at the end names what was not logged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from job.config import IMAGE_SHAPE, NUM_CLASSES, TrainConfig
from job.errors import Terminated

log = logging.getLogger(__name__)

# The settings of TrainConfig that change the trained model.
PARAMS = ("epochs", "batch_size", "learning_rate", "hidden_units", "seed", "deterministic")
PARAMS += ("max_train_samples",)
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "images_per_second")
FIGURES = ("predictions.png", "confusion_matrix.png", "misclassified.png")
EXAMPLE_IMAGES = 5  # the model's input example
# MLflow's own: 7 retries, backoff factor 2, 120 s a request (minutes in all).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow's log records go through the job's handler (one format, JSON too);
# a batch job sends no usage telemetry.
QUIET_DEFAULTS = {"MLFLOW_CONFIGURE_LOGGING": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


@contextlib.contextmanager
def tracked(config: TrainConfig, state, placement) -> Iterator[Tracker]:
    """The run's Tracker for the block: one that records on the chief of a
    tracked run (its MLflow run opened or resumed now), else one that does
    nothing. A failure in the block marks the MLflow run KILLED (SIGTERM,
    Ctrl-C) or FAILED; the block ends with the line of what was not logged."""
    tracker = Tracker(config)
    if config.mlflow_tracking_uri and placement.is_chief:
        tracker.start(state, placement)
    try:
        yield tracker
    except BaseException as err:
        stopped = isinstance(err, Terminated | KeyboardInterrupt)
        tracker.end("KILLED" if stopped else "FAILED")
        raise
    finally:
        tracker.report()


class Tracker:
    """One MLflow run, fed by the runner; every call is safe: a failure is
    recorded, never raised."""

    def __init__(self, config: TrainConfig):
        self.config = config
        # For the log: the URI without a password it may hold.
        self.uri = re.sub(r"(?<=//)[^/@]*:[^/@]*@", "", config.mlflow_tracking_uri or "")
        self.client = None  # MlflowClient while tracking
        self.run_id: str | None = None
        self.error: str | None = None  # the first failure: nothing is sent after it
        self.missed: list[str] = []  # what was not logged, for the last line
        self.missed_epochs: list[int] = []

    def start(self, state, placement) -> None:
        for name, value in {**HTTP_DEFAULTS, **QUIET_DEFAULTS}.items():
            os.environ.setdefault(name, value)
        try:
            import mlflow
        except ImportError:
            log.warning("mlflow is not installed (pip install 'mnist-job[mlflow]'): not tracked")
            return
        self.client = mlflow.MlflowClient(self.config.mlflow_tracking_uri)
        self._send("the run", lambda: self._open(state))
        self._send("params and tags", lambda: self._describe(state, placement, mlflow.__version__))
        logged = set()
        if state.history:
            self._send("", lambda: logged.update(self._logged_epochs()))
        for record in state.history:
            if record["epoch"] not in logged:
                self.epoch_end(record)

    def _open(self, state) -> None:
        from mlflow.exceptions import MlflowException

        if state.mlflow_run_id:
            try:
                self.client.update_run(state.mlflow_run_id, status="RUNNING")
                self.run_id = state.mlflow_run_id
                log.info("MLflow: resuming run %s at %s", self.run_id, self.uri)
                return
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "MLflow: no run %s at %s; starting a new one", state.mlflow_run_id, self.uri
                )
        run = self.client.create_run(self._experiment_id())
        self.run_id = state.mlflow_run_id = run.info.run_id
        log.info("MLflow: tracking run %s at %s", self.run_id, self._link(run.info.experiment_id))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.mlflow_experiment
        if experiment := self.client.get_experiment_by_name(name):
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, _artifact_location(self.config))
        except MlflowException as err:  # another run created it meanwhile
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def _describe(self, state, placement, mlflow_version: str) -> None:
        """Params and tags; a resumed run keeps the params it started with
        and records a changed one (more --epochs) as the tag resumed.NAME."""
        from mlflow.entities import Param, RunTag

        from job.outputs import versions

        params = {name: getattr(self.config, name) for name in PARAMS}
        params["train_images"] = state.fingerprint["train_size"]
        tags = {f"version.{k}": v for k, v in {**versions(), "mlflow": mlflow_version}.items()}
        tags |= {
            "strategy": placement.strategy_name,
            "device": ", ".join(placement.gpus) or "CPU",
            "replicas": placement.num_replicas,
            "workers": max(1, placement.cluster.num_workers),
        }
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        logged = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != _text(v)}
        tags |= {f"resumed.{k}": v for k, v in changed.items()}
        self.client.log_batch(
            self.run_id,
            params=[Param(k, _text(v)) for k, v in params.items() if k not in logged],
            tags=[RunTag(k, _text(v)) for k, v in tags.items()],
        )

    def _logged_epochs(self) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, "loss")}

    def epoch_end(self, record: dict) -> None:
        """One epoch's metrics (job.loop.epoch_record), at step = epoch."""
        if self.client is None:
            return
        metrics = {name: record[name] for name in EPOCH_METRICS}
        if not self._send("", lambda: self._log_metrics(metrics, record["epoch"])):
            self.missed_epochs.append(record["epoch"])

    def finish(self, config: TrainConfig, metrics: dict, model, test_images: np.ndarray) -> None:
        """The chief's last act, after metrics.json: test metrics, artifacts and
        the model; then the run is FINISHED. `config`: the run's local paths."""
        results = {f"test_{name}": value for name, value in metrics["test"].items()}
        throughput = metrics["throughput"]["train_images_per_second"]
        if throughput is not None:
            results["train_images_per_second"] = throughput
        self._send("test metrics", lambda: self._log_metrics(results, len(metrics["history"])))
        paths = [config.output_dir / name for name in FIGURES] + [config.metrics_path]
        for path in (p for p in paths if p.exists()):
            self._send(path.name, lambda p=path: self.client.log_artifact(self.run_id, str(p)))
        self._send("the model", lambda: self._log_model(model, test_images))
        self.end("FINISHED")

    def _log_metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def _log_model(self, model, test_images: np.ndarray) -> None:
        """With MLflow's tensorflow flavor: its keras flavor fails to save an
        input example with Keras 3.15 (FileNotFoundError, input_example.json)."""
        import mlflow.tensorflow
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        example = (test_images[:EXAMPLE_IMAGES] / 255).astype(np.float32)
        signature = ModelSignature(
            Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
            Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
        )
        name = self.config.mlflow_model_name
        # MLflow checks the example by predicting with Keras' progress bar on
        # stdout, and prints the registration on stderr: the job logs its own.
        with (
            _tracking_uri(mlflow, self.config.mlflow_tracking_uri),
            mlflow.start_run(run_id=self.run_id, log_system_metrics=False),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            info = mlflow.tensorflow.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                registered_model_name=name,
                # Given, not inferred: inference loads the model in a subprocess (~7 s).
                pip_requirements=mlflow.tensorflow.get_default_pip_requirements(),
            )
        if name:
            log.info("MLflow: registered model %s version %s", name, info.registered_model_version)

    def end(self, status: str) -> None:
        if self.run_id:
            self._send("", lambda: self.client.set_terminated(self.run_id, status))
            self.run_id = None

    def report(self) -> None:
        """The last line: what could not be logged, if anything."""
        missed = list(self.missed)
        if self.missed_epochs:
            first, last = self.missed_epochs[0], self.missed_epochs[-1]
            epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
            missed.insert(int("params and tags" in missed), f"the metrics of {epochs}")
        if missed:
            what = "everything" if "the run" in missed else ", ".join(missed)
            log.warning("MLflow at %s, not logged: %s (%s)", self.uri, what, self.error)

    def _send(self, what: str, action) -> bool:
        """Run `action` unless tracking is off or has failed; True if it ran."""
        if self.client is None:
            return False
        if self.error is None:
            try:
                action()
                return True
            except Exception as err:  # tracking never fails the run
                self.error = err = _reason(err)
                log.warning("MLflow at %s failed; the run goes on untracked: %s", self.uri, err)
        if what:
            self.missed.append(what)
        return False

    def _link(self, experiment_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        return f"{self.uri} (experiment {self.config.mlflow_experiment})"


@contextlib.contextmanager
def _tracking_uri(mlflow, uri: str) -> Iterator[None]:
    """MLflow's global URI for the block, which log_model needs; it also sets
    MLFLOW_TRACKING_URI, which the processes started later must not inherit."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unsets MLFLOW_TRACKING_URI
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _artifact_location(config: TrainConfig) -> str | None:
    """Beside a sqlite:/// database (in mlartifacts/), not in MLflow's default
    ./mlruns of whatever the working directory is; None: the server's choice."""
    uri = config.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str | None:
    """The commit of the git checkout the job runs from; None in an image."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        command = ["git", "-C", str(root), "rev-parse", "HEAD"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _text(value) -> str:
    """A param's value as the command line takes it: hidden units as 128,64."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _reason(err: Exception) -> str:
    """What went wrong, in a few words: MLflow's messages run to a page."""
    text = str(err).strip()
    if cause := re.search(r"\[Errno -?\d+\] [^'\"()]+|\w+ timed out", text):
        return cause.group(0).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
