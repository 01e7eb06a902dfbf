"""Keras' optional imports the job never uses, kept out of its start-up.

Keras imports scikit-learn (for its scikit-learn wrappers) and pandas (so that
`fit` takes DataFrames) as it starts, whenever they are installed. The job uses
neither, yet wherever MLflow is installed both are: they cost `import
tensorflow` ~0.9 s and ~60 MB of peak RSS on 2 cores. Keras is written to run
without them (it imports them in `try: ... except ImportError`), so the job
lets those imports fail; everything else, MLflow included, imports them as usual.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

# Top-level packages Keras imports only if present and the job never needs.
UNUSED_BY_THE_JOB = frozenset({"sklearn", "pandas"})


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
        if fullname in UNUSED_BY_THE_JOB and _importer(sys._getframe(1)).startswith("keras."):
            raise ModuleNotFoundError(f"{fullname} is not used by mnist-job", name=fullname)
        return None  # any other import: the next finder's


def keep_out_of_keras() -> None:
    """From now on Keras starts as if scikit-learn and pandas were not installed.
    Call before TensorFlow or Keras is imported; calling again does nothing."""
    if not any(isinstance(finder, _KeptOutOfKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KeptOutOfKeras())
