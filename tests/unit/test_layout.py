"""The house: the worker's runtime never imports the tools (worker/tools/), which only
the CLI's commands load; test modules share helpers through helper modules, never
through each other."""

import ast
from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "worker"
ENTRY_POINT = WORKER / "cli.py"  # its commands load the tools they run, lazily


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_runtime_never_imports_the_tools() -> None:
    runtime = [p for p in sorted(WORKER.glob("*.py")) if p != ENTRY_POINT]
    assert len(runtime) > 20
    offenders = {
        p.name: sorted(m for m in imported_modules(p) if m.startswith("worker.tools"))
        for p in runtime
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_cli_loads_the_tools_only_inside_its_commands() -> None:
    tree = ast.parse(ENTRY_POINT.read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module)
            top_level.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            top_level.update(a.name for a in node.names)
    assert any(m.startswith("worker.tools") for m in imported_modules(ENTRY_POINT))
    assert not {m for m in top_level if m.startswith("worker.tools")}


def test_test_modules_import_helpers_not_other_test_modules() -> None:
    tests = WORKER.parent / "tests"
    offenders = {
        str(p.relative_to(tests)): sorted(
            m for m in imported_modules(p) if m.rsplit(".", 1)[-1].startswith("test_")
        )
        for p in sorted(tests.rglob("test_*.py"))
    }
    assert len(offenders) > 40
    assert not {k: v for k, v in offenders.items() if v}
