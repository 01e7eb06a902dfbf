"""`mnist-job` as a subprocess, but trained on tiny data: the real CLI, signal
handling and exit codes, with `job.data.load` swapped for the tiny dataset.

Set TINY_JOB_WEIGHTS=<file-{index}.npz> to dump the final weights of every
worker (non-chief ones too; {index} is the worker's TF_CONFIG index) to a path
outside the output dir, for tests that compare them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from job import cli, data, runner
from tests.tiny import tiny_mnist

data.load = lambda data_dir, **kwargs: tiny_mnist(
    n_train=int(os.environ.get("TINY_JOB_TRAIN", "320"))
)

weights_path = os.environ.get("TINY_JOB_WEIGHTS")
if weights_path:
    real_run = runner.run

    def run_and_dump(config, **kwargs):
        result = real_run(config, **kwargs)
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
        np.savez(weights_path.format(index=task.get("index", 0)), *result.model.get_weights())
        return result

    runner.run = run_and_dump

if __name__ == "__main__":
    cli.main()
