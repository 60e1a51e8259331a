"""The layout's rules, read from the source: `nano/` is the floor (it imports no stage and not the command line),
packages import each other without cycles, and no package reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FLOOR = "nano"
PACKAGES = ("nano", "prune", "distill", "quantize", "export", "bench", "serve", "cli")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, function-local ones included (they are dependencies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _package_edges() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: [files importing it]}} among PACKAGES."""
    edges: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, _ in _imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package:
                    edges[package].setdefault(top, []).append(str(path.relative_to(ROOT)))
    return edges


def test_the_rules_see_every_package():
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package
    assert set(_package_edges()["cli"]) == set(PACKAGES) - {"cli"}  # the command line sits above every stage


def test_nano_is_the_floor():
    reached = _package_edges()[FLOOR]
    assert not reached, f"nano/ imports {', '.join(f'{p} (in {files[0]})' for p, files in reached.items())}"


def test_no_cycle_between_packages():
    edges = {p: set(targets) for p, targets in _package_edges().items()}
    state: dict[str, str] = {}

    def visit(package: str, path: list[str]) -> None:
        state[package] = "open"
        for target in sorted(edges[package]):
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' → '.join(path[path.index(target):] + [package, target])}")
            if target not in state:
                visit(target, path + [package])
        state[package] = "done"

    for package in PACKAGES:
        if package not in state:
            visit(package, [])


def test_no_package_imports_another_packages_private_names():
    offences = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, names in _imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package:
                    private = [n for n in names if n.startswith("_")] + \
                              [m for m in module.split(".")[1:] if m.startswith("_")]
                    offences += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in private]
    assert not offences, offences


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks read real imports: a floor module importing a stage, and a private name, are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from distill.run import _job\n    import export.graph\n")
    assert _imports(bad) == [("distill.run", ["_job"]), ("export.graph", [])]
