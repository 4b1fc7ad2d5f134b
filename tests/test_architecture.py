"""Architecture checks: module size, import contracts, a framework-free prepare, no local paths."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lungct"
MAX_LINES = 450
STAGES = ("lungct.prepare", "lungct.train", "lungct.interpret", "lungct.predict")
FRAMEWORKS = ("keras", "tensorflow", "jax")
# Written in pieces so that this file does not match its own check.
LOCAL_PATHS = ("..", "/shared"), ("/work", "/")
LOCAL_PATHS_ALLOWED = {"benchmarks/RESULTS.md"}


def test_modules_are_at_most_450_lines() -> None:
    """Every module under lungct/ has at most 450 lines."""
    counts = {
        path.relative_to(REPO).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    too_long = {name: n for name, n in counts.items() if n > MAX_LINES}
    listing = ", ".join(f"{name} ({n} lines)" for name, n in too_long.items())
    assert not too_long, f"modules over {MAX_LINES} lines: {listing}"


def test_import_contracts_are_kept() -> None:
    """lint-imports keeps every [tool.importlinter] contract in pyproject.toml."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: run `make setup`"
    done = subprocess.run(
        [str(lint_imports)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"lint-imports failed:\n{done.stdout}\n{done.stderr}"


def test_ground_contract_lists_every_ground_module() -> None:
    """The ground-modules contract names every lungct/ root module and non-stage package."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    ground = [
        c for c in contracts
        if c["type"] == "forbidden" and set(STAGES) <= set(c.get("forbidden_modules", ()))
    ]
    assert len(ground) == 1, "expected one contract forbidding imports of all the stage packages"
    modules = {f"lungct.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"lungct.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    expected = modules | (packages - set(STAGES))
    missing = sorted(expected - set(ground[0]["source_modules"]))
    assert not missing, f"add to source_modules of {ground[0]['name']!r}: {missing}"


def test_prepare_runs_without_a_deep_learning_framework(tmp_path: Path) -> None:
    """The prepare stage builds a tiny synthetic dataset without importing keras, TF or JAX."""
    output = tmp_path / "ds"
    argv = [
        "--source", "synthetic", "--synthetic-patients", "4", "--synthetic-size", "64",
        "--image-size", "32", "--target-count", "40", "--workers", "1",
        "--work-dir", str(tmp_path), "--output", str(output), "-q",
    ]
    code = textwrap.dedent(f"""
        import sys
        from lungct.prepare.cli import main
        rc = main({argv!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
        if loaded:
            sys.exit("prepare imported: " + ", ".join(loaded))
        sys.exit(rc)
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, f"prepare failed:\n{done.stdout}\n{done.stderr}"
    assert (output / "manifest.csv").is_file()


def test_no_tracked_file_names_a_local_path() -> None:
    """No tracked file except benchmarks/RESULTS.md names this machine's folders."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(
        [git, "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    needles = ["".join(parts).encode() for parts in LOCAL_PATHS]
    offenders = []
    for name in sorted(filter(None, listed.stdout.decode().split("\0"))):
        path = REPO / name
        if name in LOCAL_PATHS_ALLOWED or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if any(needle in line for needle in needles):
                offenders.append(f"{name}:{number}")
    assert not offenders, f"local paths in tracked files: {', '.join(offenders)}"



def _import_froms(path: Path) -> list[ast.ImportFrom]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


def test_no_private_names_cross_modules() -> None:
    """No lungct module imports another lungct module's private (underscore) names."""
    offenders = [
        f"{path.relative_to(REPO)}: {alias.name} from {node.module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in _import_froms(path)
        if node.module and node.module.startswith("lungct")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not offenders, f"private names imported across modules: {offenders}"


def test_no_re_export_facades() -> None:
    """Every name a module lists in __all__ is defined there, not imported from elsewhere."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        imported = {alias.asname or alias.name for node in _import_froms(path)
                    for alias in node.names}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value:
                listed = ast.literal_eval(node.value)
                offenders += [f"{path.relative_to(REPO)}: {name}" for name in listed
                              if name in imported]
    assert not offenders, f"names re-exported from other modules: {offenders}"


def test_no_import_cycles() -> None:
    """No lungct module reaches itself through its imports (grimp, import-linter's graph)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("lungct")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, f"import cycles: {cycles}"
