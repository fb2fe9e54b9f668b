"""The package boundaries the design relies on, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_the_service_uses_only_the_pools_public_package():
    offenders = {f"{p.name}: {m}" for p in (REPO / "executor_service").glob("*.py")
                 for m in _imports(p) if m.startswith("warm_pool.")}
    assert not offenders, "import these from warm_pool itself: " + ", ".join(sorted(offenders))


def test_the_service_process_never_imports_torch():
    offenders = {f"{p.name}: {m}" for p in (REPO / "executor_service").glob("*.py")
                 for m in _imports(p) if m.split(".")[0] in ("torch", "torch_xla", "torch_neuronx")}
    assert not offenders, offenders
