"""The architecture as the README draws it: the library never imports the launched entry points, and
those stay thin (the jobs, the search and the serving application live in ``llm_platform``)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_PACKAGES = ("train_jobs", "tune_spaces", "serve_apps")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_entry_points():
    offenders = {str(path.relative_to(REPO)): sorted(m for m in imported_modules(path)
                                                      if m.split(".")[0] in ENTRY_PACKAGES)
                 for path in (REPO / "llm_platform").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_entry_points_only_hand_over_to_the_library():
    for package in ENTRY_PACKAGES:
        for path in (REPO / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            functions = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            assert not functions, f"{path.relative_to(REPO)} defines {functions}: that belongs in llm_platform"
            assert len(path.read_text().splitlines()) <= 15, path
