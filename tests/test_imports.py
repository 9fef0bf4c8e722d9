"""The import rules of README: no import circle in the product code, and the import-linter contracts of
pyproject.toml (which `make lint` runs) hold, and fail when a forbidden import is added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["cloud", "wire", "broker", "device_firmware_py"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_product_code_has_no_import_circle() -> None:
    graph = grimp.build_graph(*PACKAGES)

    assert circles(graph) == []


def test_circles_are_found_when_there_is_one(tmp_path: Path) -> None:
    # Prepare: a package whose two modules import each other (inside a function, as circles hide)
    package = tmp_path / "circular"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f() -> None:\n    from circular import b\n")
    (package / "b.py").write_text("from circular import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("circular")
    finally:
        sys.path.remove(str(tmp_path))

    # Execute / Assert
    assert circles(graph) == [["circular.a", "circular.b"]]


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_hold_and_fail_on_a_forbidden_import(tmp_path: Path) -> None:
    # Prepare: a copy of the product code, then the same with the API importing the ML
    for name in [*PACKAGES, "testsupport"]:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    # Execute
    clean = lint_imports(tmp_path)
    health = tmp_path / "cloud" / "api" / "routes" / "health.py"
    health.write_text(health.read_text() + "\nfrom cloud.ml import nets  # noqa: E402,F401\n")
    broken = lint_imports(tmp_path)

    # Assert
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "the API never loads the ML (torch), not even through the pipeline BROKEN" in broken.stdout
    assert "cloud.api.routes.health -> cloud.ml.nets" in broken.stdout
