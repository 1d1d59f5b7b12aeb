"""hostd and the shared package never import the coordinator: what both sides must agree on
lives in `whimbrel` (protocol, validate, files, tls), so a host runs without coordinator code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["hostd", "whimbrel"])
def test_package_does_not_import_the_coordinator(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path)
                                            if m.split(".")[0] == "coordinator")
        for path in sorted((ROOT / package).rglob("*.py"))
    }  # fmt: skip
    assert {path: mods for path, mods in offenders.items() if mods} == {}
