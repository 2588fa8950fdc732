"""The architecture as the imports show it: gateway and worker never import each other."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _imported_packages(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("gateway", {"worker", "tokenrelay"}),
        ("worker", {"gateway", "tokenrelay"}),
        ("shared", {"gateway", "worker", "tokenrelay"}),
    ],
)
def test_package_boundaries(package: str, forbidden: set[str]) -> None:
    assert not _imported_packages(package) & forbidden
