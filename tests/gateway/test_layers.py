"""The gateway's layer picture (in gateway/__init__.py) against its imports."""

from __future__ import annotations

import ast
import pathlib
import re

import gateway

PACKAGE = pathlib.Path(gateway.__file__).parent


def _layers() -> list[list[str]]:
    """The modules of each layer, bottom first, as the package docstring draws them."""
    doc = gateway.__doc__ or ""
    layers: list[list[str]] = []
    continued = False  # a layer's list of modules ended with a comma: it goes on below
    for line in doc.splitlines():
        match = re.fullmatch(r" {4}(\w+) {2,}([\w, ]+)", line)
        more = re.fullmatch(r" {15}([\w, ]+)", line) if continued else None
        if match:
            layers.append([name.strip() for name in match[2].split(",") if name.strip()])
        elif more:
            layers[-1].extend(name.strip() for name in more[1].split(",") if name.strip())
        continued = bool(match or more) and line.rstrip().endswith(",")
    return layers


def _imports(module: str) -> set[str]:
    """The gateway modules ``module`` imports, TYPE_CHECKING blocks and function bodies too."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gateway":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("gateway."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("gateway.")
            )
    return found - {module}


def test_every_module_is_in_the_picture_once() -> None:
    drawn = [module for layer in _layers() for module in layer]
    on_disk = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(_layers()) == 5
    assert sorted(drawn) == on_disk


def test_imports_point_down_the_layers_only() -> None:
    layer_of = {module: index for index, layer in enumerate(_layers()) for module in layer}
    upward = [
        f"{module} -> {imported}"
        for module in layer_of
        for imported in _imports(module)
        if layer_of[imported] > layer_of[module]
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    graph = {p.stem: _imports(p.stem) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_one_module_imports_uvicorn_and_the_core_knows_no_http() -> None:
    def third_party(module: str) -> set[str]:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        return names

    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    assert [m for m in modules if "uvicorn" in third_party(m)] == ["server"]
    wire, core = _layers()[0], _layers()[1]
    for module in wire + core:
        assert not third_party(module) & {"starlette", "uvicorn", "httptools"}, module


def test_no_module_is_over_about_400_lines() -> None:
    # A module a newcomer reads in one sitting; past this, split it by what it holds.
    sizes = {p.stem: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {module: n for module, n in sizes.items() if n > 420} == {}
