"""Runs whose outputs go to a bucket: written locally first, then mirrored.

Every writer of the job (Keras, the SavedModel export, TensorBoard's event
writers, the checkpoint) writes local files. A run whose output, model,
checkpoint or TensorBoard dir is a gs:// or s3:// URI does exactly what a
local run does in a staging dir (`--staging-dir`, by default under the
system's temp dir, one per set of URIs and worker) and mirrors it to the
bucket: each checkpoint as soon as it is written, the TensorBoard logs after
every epoch, and at the end every artifact, then metrics.json last, so that
its presence in the bucket means the run finished there.

The bucket is the record: a finished run there is refused without
--overwrite, its lock (job/bucketlock.py) keeps a second run out, and a run
resumes from the bucket's checkpoint, unless the staging dir holds a later one
(an upload that failed), which is then resumed and uploaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from job import bucketlock, storage
from job.config import TrainConfig
from job.errors import ConfigError, JobError

log = logging.getLogger(__name__)

DIRS = ("output_dir", "model_dir", "checkpoint_dir", "tensorboard_dir")
METRICS = "metrics.json"


def staging_root(config: TrainConfig, task: str) -> Path:
    """The same dir for every run of the same URIs by the same worker, so that
    a rerun on this machine finds a checkpoint that did not reach the bucket."""
    key = json.dumps([task, *(str(getattr(config, name)) for name in DIRS)])
    base = config.staging_dir or Path(tempfile.gettempdir()) / "mnist-job-staging"
    return Path(base) / hashlib.sha256(key.encode()).hexdigest()[:16]


class Mirror:
    """`local`: the config to run, every bucket dir replaced by a staging dir;
    `config`: the run's own, as given. Does nothing when no dir is a bucket."""

    def __init__(self, config: TrainConfig, task: str = "chief"):
        self.config = config
        remote = {
            name: getattr(config, name) for name in DIRS if storage.is_uri(getattr(config, name))
        }
        root = staging_root(config, task) if remote else None
        local = {name: root / name.removesuffix("_dir") for name in remote}
        self.local = config.replace(**local)
        self.pairs = sorted(
            ((local[name], remote[name]) for name in remote), key=lambda p: -len(p[0].parts)
        )
        self.output_uri = remote.get("output_dir")
        self.lock: bucketlock.Lock | None = None
        self._uploaded: dict[Path, tuple[int, int]] = {}

    @property
    def active(self) -> bool:
        return bool(self.pairs)

    def remote(self, path: Path) -> str | None:
        """The URI that local `path` is mirrored to, or None if it stays local."""
        for local, uri in self.pairs:
            if path == local or local in path.parents:
                return storage.join(uri, *path.relative_to(local).parts)
        return None

    def shown(self, path: Path) -> str:
        """Where `path` is for the user: its URI if mirrored."""
        return self.remote(path) or str(path)

    @contextlib.contextmanager
    def claimed(self, is_chief: bool) -> Iterator[None]:
        """The bucket dirs, checked and (the output dir) locked for the block."""
        if not self.active:
            yield
            return
        log.info("Staging outputs in %s for %s", self.pairs[-1][0].parent, self.describe())
        if not is_chief:
            self._refuse_finished_run()
            yield
            return
        for local, uri in self.pairs:
            if uri != self.output_uri:
                storage.check_writable(uri, _what(self.local, local))
        lock = bucketlock.held(self.output_uri) if self.output_uri else contextlib.nullcontext()
        with lock as self.lock:
            self._refuse_finished_run()
            # The bucket says whether the run finished; a staged metrics.json
            # whose upload failed must not make the rerun look finished.
            self.local.metrics_path.unlink(missing_ok=True)
            yield

    def describe(self) -> str:
        return ", ".join(uri for _, uri in reversed(self.pairs))

    def finished(self) -> bool:
        """Whether the bucket holds a finished run (its metrics.json)."""
        return bool(self.output_uri) and storage.exists(storage.join(self.output_uri, METRICS))

    def _refuse_finished_run(self) -> None:
        if self.finished() and not self.config.overwrite:
            raise ConfigError(
                f"{self.output_uri} holds a finished run (metrics.json): "
                "pass --overwrite to replace it, or choose another --output-dir"
            )

    def fetch_checkpoint(self) -> None:
        """The bucket's checkpoint into the staging dir, unless the one there
        is later (saved, then its upload failed)."""
        path = self.local.checkpoint_path
        uri = self.remote(path)
        if uri is None:
            return
        fetched = path.with_name(".from-bucket." + path.name)
        if not storage.download(uri, fetched):
            return
        staged, from_bucket = _global_step(path), _global_step(fetched)
        if staged is not None and (from_bucket is None or staged > from_bucket):
            log.warning(
                "Resuming from %s (step %d), later than the bucket's %s; it is uploaded "
                "at the next checkpoint",
                path,
                staged,
                uri,
            )
            fetched.unlink()
            return
        fetched.replace(path)

    def checkpoint_saved(self) -> None:
        path = self.local.checkpoint_path
        if uri := self.remote(path):
            self._check_lock()
            with self._naming_the_kept_checkpoint():
                storage.upload(path, uri)

    def logs_written(self) -> None:
        """Upload the TensorBoard event files that changed, so the logs in the
        bucket stay readable while training runs."""
        if uri := self.remote(self.local.tensorboard_path):
            self._check_lock()
            with self._naming_the_kept_checkpoint():
                self._upload_tree(self.local.tensorboard_path, uri)

    @contextlib.contextmanager
    def _naming_the_kept_checkpoint(self) -> Iterator[None]:
        """A failed upload mid-run says where the run's checkpoint is: a rerun
        on this node resumes from it."""
        try:
            yield
        except JobError as err:
            path = self.local.checkpoint_path
            if not path.exists():
                raise
            raise JobError(f"{err}; the checkpoint is kept in {path}") from None

    def publish_artifacts(self) -> None:
        """Everything in the staging dirs but metrics.json."""
        self._check_lock()
        for local, uri in self.pairs:
            self._upload_tree(local, uri)

    def publish_metrics(self) -> None:
        """Last: metrics.json, the mark of a finished run."""
        if uri := self.remote(self.local.metrics_path):
            self._check_lock()
            storage.upload(self.local.metrics_path, uri)

    def delete(self, path: Path) -> None:
        """Delete what local `path` is mirrored to (an object or a prefix)."""
        if uri := self.remote(path):
            storage.delete(uri)
        self._uploaded = {
            p: s for p, s in self._uploaded.items() if p != path and path not in p.parents
        }

    def _upload_tree(self, local: Path, uri: str) -> None:
        for path in sorted(storage.files_under(local)) if local.is_dir() else []:
            relative = path.relative_to(local)
            if path.name == METRICS and path == self.local.metrics_path:
                continue
            if any(part.startswith(".") for part in relative.parts):
                continue  # temporaries, locks and probes
            stat = path.stat()
            if self._uploaded.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            storage.upload(path, storage.join(uri, *relative.parts))
            self._uploaded[path] = (stat.st_size, stat.st_mtime_ns)

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def discard_staging(self) -> None:
        """Remove the staging dirs (tests and tools; a run keeps them)."""
        for local, _ in self.pairs:
            shutil.rmtree(local, ignore_errors=True)


def _what(config: TrainConfig, local: Path) -> str:
    for name in DIRS:
        if getattr(config, name) == local:
            return name.replace("_dir", " dir").replace("tensorboard", "TensorBoard")
    return "dir"


def _global_step(path: Path) -> int | None:
    """The checkpoint's global step, or None if there is none or it is unreadable."""
    from job import checkpoint

    try:
        saved = checkpoint.load(path)
    except JobError:
        return None
    return None if saved is None else saved[2].global_step
