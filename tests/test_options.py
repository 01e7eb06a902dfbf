"""The command line's options: their types refuse bad values with one line,
and `train`'s defaults are the ones a run really uses (TrainConfig's)."""

from __future__ import annotations

import dataclasses
import os

import click
import pytest

from job.config import DEFAULTS, from_options
from job.options import PATH, HiddenUnits, train_options


@train_options
@click.command()
def train(**options):
    """A command with train's options, to read what click makes of them."""


def test_hidden_units_parse_as_a_tuple_of_positive_widths():
    assert HiddenUnits().convert("256,128,64", None, None) == (256, 128, 64)
    for bad in ("", "128,", "0", "-1,3", "wide"):
        with pytest.raises(click.BadParameter, match="comma-separated list of positive"):
            HiddenUnits().convert(bad, None, None)


def test_an_empty_directory_is_refused_rather_than_taken_as_the_working_dir():
    with pytest.raises(click.BadParameter, match="empty path"):
        PATH.convert("  ", None, None)


def test_train_without_options_is_the_default_config(monkeypatch):
    for name in [name for name in os.environ if name.startswith("MNIST_JOB_")]:
        monkeypatch.delenv(name)
    params = train.make_context("train", []).params
    options = {k: v for k, v in params.items() if k not in ("verbose", "sagemaker_model_dir")}
    built = from_options(options, {})
    # Fields without an option of their own: set by --verbose/--quiet, or none.
    assert dataclasses.replace(built, verbosity=DEFAULTS.verbosity) == DEFAULTS
