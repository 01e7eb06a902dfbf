"""job.lean_imports: Keras starts without scikit-learn, pandas and matplotlib,
whose Keras features the job never uses; every other importer still gets them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("sklearn", "pandas")),
    reason="needs scikit-learn and pandas installed (the dev venv has both, through MLflow)",
)


def imported_by_keras(keep_out: bool) -> list[str]:
    """In a fresh interpreter: which of scikit-learn, pandas and matplotlib
    `import keras` loads, then whether importing them directly still works."""
    code = (
        "import sys\n"
        "from job.lean_imports import keep_out_of_keras\n"
        + ("keep_out_of_keras(); keep_out_of_keras()\n" if keep_out else "")
        + "import keras\n"
        "print(sorted(m for m in ('sklearn', 'pandas', 'matplotlib') if m in sys.modules))\n"
        "import sklearn.base, pandas, matplotlib.figure\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_keras_starts_without_them_and_everyone_else_still_imports_them():
    # The job draws its figures with matplotlib after training: it still can.
    assert imported_by_keras(keep_out=True) == ["[]", "imported"]


def test_without_it_keras_imports_both():
    """What the module is for: without it, Keras pays for all three at start-up."""
    assert imported_by_keras(keep_out=False) == ["['matplotlib', 'pandas', 'sklearn']", "imported"]


def test_the_finder_is_installed_once():
    from job import lean_imports

    before = list(sys.meta_path)
    try:
        lean_imports.keep_out_of_keras()
        lean_imports.keep_out_of_keras()
        added = [f for f in sys.meta_path if f not in before]
        assert len(added) <= 1
        assert sum(isinstance(f, lean_imports._KeptOutOfKeras) for f in sys.meta_path) == 1
    finally:
        sys.meta_path[:] = before
