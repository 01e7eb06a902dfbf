"""The seed's defaults on the real MNIST: the accuracy users were promised."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_seed_defaults_reach_97_percent(tmp_path):
    # The real CLI with the real data path: fetches MNIST into the user's cache
    # (verified) unless it is there already, as `make train` would.
    result = subprocess.run(
        [sys.executable, "-m", "job", "train", "--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 5 and metrics["config"]["batch_size"] == 32
    assert len(metrics["history"]) == 5
    assert metrics["test"]["accuracy"] >= 0.97
