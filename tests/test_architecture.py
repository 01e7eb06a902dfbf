"""The package stays a house a newcomer can find their way in: modules small
enough to read in one sitting, no import cycles, a test file per module."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "job"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
MAX_MODULE_LINES = 320  # "about 300": data.py, the longest, is 317
MAX_FUNCTION_LINES = 65


def job_imports(module: str) -> set[str]:
    """The job modules `module` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("job"):
            if node.module == "job":  # from job import a, b
                found |= {alias.name for alias in node.names if alias.name in MODULES}
            else:
                found.add(node.module.removeprefix("job."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("job.") for a in node.names if a.name.startswith("job.")}
    return found - {module}


def test_no_two_modules_import_each_other_directly_or_through_others():
    graph = {module: job_imports(module) for module in MODULES}

    def cycle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [cycle_from(module, module, [module]) for module in MODULES]
    assert [c for c in cycles if c] == []


def test_the_write_primitive_depends_on_nothing_but_errors():
    assert job_imports("artifacts") == {"errors"}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_reads_in_one_sitting(module):
    source = (PACKAGE / f"{module}.py").read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("__init__", "__main__")])
def test_every_module_has_its_test_file(module):
    assert (ROOT / "tests" / f"test_{module}.py").is_file()
