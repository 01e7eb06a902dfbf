"""`mnist-job export`: parses and calls job/export.py.

Registered on the `mnist-job` group by job/cli.py. Like it, nothing here
imports TensorFlow: a bad option is one line and exit 2 at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from job.errors import EXIT_CODES_HELP
from job.options import POSITIVE, model_option, option


@click.command(epilog=EXIT_CODES_HELP)
@model_option
@option(
    "--format",
    "export_format",
    type=click.Choice(("saved_model", "onnx", "litert")),
    required=True,
    help="saved_model (TensorFlow, TF Serving), onnx (ONNX Runtime) or litert (.tflite).",
)
@option(
    "--output",
    type=click.Path(),  # a str: a gs:// or s3:// URI is refused by name, not mangled
    default=None,
    help="Where the export goes, a local path. [default: saved_model/, model.onnx or "
    "model.tflite beside the model]",
    show_default=False,
)
@option(
    "--version",
    type=POSITIVE,
    default=None,
    help="saved_model only: TF Serving's layout, the SavedModel in OUTPUT/VERSION/ "
    "(OUTPUT defaults to serving/ beside the model); an existing version is never "
    "replaced. [default: no version dir]",
    show_default=False,
)
def export(model: Path | str, export_format: str, output: str | None, version) -> None:
    """Export the model as a SavedModel, an ONNX file or a LiteRT (.tflite) file:
    float32 [batch, 28, 28] in [0, 1] -> [batch, 10] probabilities.

    The export is run by its own runtime (ONNX Runtime, the LiteRT interpreter,
    tf.saved_model.load) and put in place only if its predictions match
    Keras'; otherwise exit 1, and nothing is written.
    """
    from job import collector
    from job.export import export as export_model

    _configure_logging()
    with collector.paused():
        click.echo(export_model(model, export_format, output, version).line())


def _configure_logging() -> None:
    """As `predict` sets logging up (job/cli.py; not imported from there, which
    imports this module): native log filter first, then ours on stderr."""
    from job import native_log
    from job.logs import configure

    native_log.start(1, "text")
    configure(1, "text")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
