"""The library (pagellm/) never depends on the application (actors/, jobs/): the arrow
points one way, so the library imports, tests and runs without Ray actors or job code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = {"actors", "jobs"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import statement, and for importlib.import_module("...") /
    __import__("...") calls with a literal name, anywhere in the module (functions included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_walker_sees_every_form_of_import():
    code = ("import actors.learner\nfrom jobs.common import x\nimport os\n"
            "def f():\n    import importlib\n    importlib.import_module('jobs.ppo')\n    __import__('actors')\n")
    assert [m for _, m in imported_modules(ast.parse(code))] == [
        "actors.learner", "jobs.common", "os", "importlib", "jobs.ppo", "actors"]


def test_no_library_module_imports_actors_or_jobs():
    files = sorted((ROOT / "pagellm").rglob("*.py"))
    assert len(files) > 30  # the walk found the library
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module.split(".")[0] in APPLICATION
    ]
    assert not offenders, "the library must not import the application:\n" + "\n".join(offenders)
