"""TensorBoard on a log dir that is a local path, `gs://bucket/...` or `s3://bucket/...`.

Plain `tensorboard` reads files through TensorFlow's `tf.io.gfile` whenever
TensorFlow is installed, as it is here, and that cannot serve the job's
buckets: it has no `s3://` at all (TensorFlow moved it to tensorflow-io,
which has no build for TF 2.21), and its `gs://` client has the Google
endpoints built in (www.googleapis.com, no `STORAGE_EMULATOR_HOST` or other
endpoint variable in TF 2.21), so it reaches real GCS only, never an emulator
or another GCS-compatible store.

TensorBoard also carries a TensorFlow-free file layer, its "stub", which reads
any scheme fsspec knows: gs:// through gcsfs and s3:// through s3fs, the
clients job/storage.py writes with, so the same credential chains and
endpoint variables (`AWS_ENDPOINT_URL`, `STORAGE_EMULATOR_HOST`) apply.
TensorBoard takes the stub when the module `tensorboard.compat.notf` imports,
so for a URI `serve` registers an empty module by that name before TensorBoard
loads, then runs TensorBoard's own main unchanged.

What the stub loses: nothing this job writes. TensorBoard 2.21 enables the
same dashboards with and without it (Scalars, Images, Graphs, HParams, Time
Series on a run's logs), and tests/test_board.py reads all four through it
over HTTP from both stores. What needs TensorFlow itself is the Debugger V2
plugin (tfdbg dumps) and the Projector's embeddings from checkpoints, which
the job does not write: those are the "reduced feature set" TensorBoard's
start-up line names. Events are then parsed in Python rather than by
TensorFlow's C++ reader, which is plenty for a run's logs (83 KB for 5 epochs
of tiny data, parsed in 15 ms); and TensorBoard starts in 1 s instead of 6 s,
as it never imports TensorFlow.

Local paths keep TensorFlow's layer: `serve` is then plain `tensorboard`.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

from job import storage
from job.errors import ConfigError, JobError


def serve(logdir: Path | str, host: str = "localhost", port: int = 6006, extra=()) -> None:
    """Run TensorBoard on `logdir` until it is stopped; `extra` are more of
    TensorBoard's own flags (e.g. `--reload_interval 10`)."""
    flags = ["--host", host, "--port", str(port)]
    if "://" in str(logdir):
        logdir = storage.location(logdir)  # one line for another scheme, no bucket
        _use_tensorflow_free_files(logdir)
        check_bucket(logdir)
        # The Rust data server (--load_fast) has a gs:// client of its own,
        # also without emulators, and no s3:// at all.
        flags.append("--load_fast=false")
    from tensorboard import main

    sys.argv = ["tensorboard", "--logdir", str(logdir), *flags, *extra]  # what absl parses
    main.run_main()


def check_bucket(uri: str) -> None:
    """Fail with one line now, rather than TensorBoard showing an empty page
    forever, when `uri`'s bucket is missing or refused. The prefix may well not
    exist yet: the run has not written yet."""
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    # gcsfs logs a traceback when it gives up; the error below says it in one line.
    gcsfs_log = logging.getLogger("gcsfs")
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)
    try:
        storage.filesystem(uri).ls(bucket)
    except FileNotFoundError:
        raise storage.missing_bucket(uri) from None
    except Exception as err:
        if storage.refused(err):
            raise ConfigError(f"cannot read {uri}: {storage.describe(err)}") from None
        # Not retried, unlike a training run's uploads: a person is waiting.
        raise JobError(f"cannot reach {uri}: {storage.describe(err)}") from None
    finally:
        gcsfs_log.setLevel(level)


def _use_tensorflow_free_files(uri: str) -> None:
    storage.filesystem(uri)  # one line, not an ImportError, without the cloud clients
    import fsspec

    # TensorBoard imports this module, if it can, before it tries TensorFlow.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    # fsspec keeps directory listings, sizes included, forever by default: a
    # live TensorBoard on s3:// then never sees an event file grow (measured:
    # epoch 2 never showed). gcsfs has the same cache, so both go. fsspec
    # makes new instances with these settings, also storage.filesystem's.
    fsspec.config.conf.setdefault("s3", {})["use_listings_cache"] = False
    fsspec.config.conf.setdefault("gs", {})["cache_timeout"] = 0
    from tensorboard.compat.tensorflow_stub.io import gfile

    # The stub reads s3:// with boto3 where boto3 is installed (the tests'
    # moto brings it) and with fsspec elsewhere (the images: s3fs needs no
    # boto3). fsspec everywhere, so that what is tested is what runs.
    gfile.register_filesystem("s3", gfile.FSSpecFileSystem())
