"""Architecture rules that code review keeps missing: checked on the source text."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_models_import_nothing_from_teachers():
    offenders = [
        f"{p.relative_to(ROOT)}: {mod}"
        for p in (ROOT / "models").rglob("*.py")
        for mod, _ in _imports(p)
        if mod.startswith("labelmill.teachers")
    ]
    assert offenders == []


def test_teachers_use_no_private_helper_of_another_module():
    offenders = [
        f"{p.relative_to(ROOT)}: {mod}.{name}"
        for p in (ROOT / "teachers").glob("*.py")
        for mod, names in _imports(p)
        if mod.startswith("labelmill.")
        for name in names
        if name.startswith("_")
    ]
    assert offenders == []
