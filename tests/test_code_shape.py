"""The shape ARCHITECTURE.md promises a reader:
functions that fit on a screen, short argument lists."""

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpmkit"
MAX_LINES, MAX_POSITIONAL = 80, 6


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(SRC)}:{node.lineno} {node.name}", node


def _positional(node) -> int:
    names = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
    return len(names) - (names[:1] in (["self"], ["cls"]))


@pytest.mark.parametrize("limit", ["lines", "positional"])
def test_every_function_fits_on_a_screen_with_a_short_argument_list(limit):
    found = list(_functions())
    assert len(found) > 300  # the walk really reads the package
    if limit == "lines":
        over = [f"{name} ({node.end_lineno - node.lineno + 1} lines)" for name, node in found
                if node.end_lineno - node.lineno + 1 > MAX_LINES]
    else:
        over = [f"{name} ({_positional(node)} positional)" for name, node in found
                if _positional(node) > MAX_POSITIONAL]
    assert not over, over


def test_the_check_sees_what_it_refuses(tmp_path):
    long = ast.parse("def f(a, b, c, d, e, f, g):\n" + "    x = 1\n" * 90)
    node = long.body[0]
    assert _positional(node) == 7 and node.end_lineno - node.lineno + 1 == 91
    method = ast.parse("class C:\n    def m(self, a, b, c, d, e, f, *, g=1):\n"
                       "        pass\n").body[0].body[0]
    assert _positional(method) == 6


def test_every_name_the_benchmarks_import_from_the_package_exists():
    """The benchmarks are run by hand, not by the suite: a renamed function would only show
    there, months later. Imports inside functions are checked too."""
    imported = []
    for path in sorted((SRC.parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpmkit"):
                imported += [(path.name, node.module, alias.name) for alias in node.names]
    assert len(imported) > 30
    missing = [f"{script}: from {module} import {name}" for script, module, name in imported
               if not _importable(module, name)]
    assert not missing, missing


def _importable(module: str, name: str) -> bool:
    parent = importlib.import_module(module)
    if hasattr(parent, name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True
