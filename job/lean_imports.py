"""Keras' optional imports that the job does not need, kept out of its start-up.

As it starts, Keras imports scikit-learn (for its scikit-learn wrappers),
pandas (so that `fit` takes DataFrames) and matplotlib's pyplot (for its
plotting utilities) whenever they are installed. The job uses none of these
features: it draws its figures with matplotlib itself, after training. On 2
cores they cost `import tensorflow` 0.6 s and 30 MB of peak RSS (matplotlib,
in every install) and 1.1 s and 120 MB more where MLflow is installed (it
brings scikit-learn and pandas). Keras is written to run without them (it
imports them in `try: ... except ImportError`), so the job lets those imports
fail; everyone else, the job's figures and MLflow included, imports them as
usual, and later.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

# Top-level packages that Keras imports only if present, for features the job
# does not use.
KEPT_OUT_OF_KERAS = frozenset({"sklearn", "pandas", "matplotlib"})


def _importer(frame) -> str:
    """The module whose `import` statement is running, importlib's frames skipped."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")):
            return name
        frame = frame.f_back
    return ""


class _KeptOutOfKeras(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in KEPT_OUT_OF_KERAS and _importer(sys._getframe(1)).startswith("keras."):
            raise ModuleNotFoundError(f"mnist-job keeps {fullname} out of Keras", name=fullname)
        return None  # any other import: the next finder's


def keep_out_of_keras() -> None:
    """From now on Keras starts as if scikit-learn, pandas and matplotlib were
    not installed. Call before TensorFlow or Keras is imported (a package
    already imported stays available to Keras); calling again does nothing."""
    if not any(isinstance(finder, _KeptOutOfKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KeptOutOfKeras())
