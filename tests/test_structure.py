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
    offenders = {f"{p.name}: {m}" for p in (REPO / "executor_service").rglob("*.py")
                 for m in _imports(p) if m.startswith("warm_pool.")}
    assert not offenders, "import these from warm_pool itself: " + ", ".join(sorted(offenders))


def test_the_service_process_never_imports_torch():
    offenders = {f"{p.name}: {m}" for p in (REPO / "executor_service").rglob("*.py")
                 for m in _imports(p) if m.split(".")[0] in ("torch", "torch_xla", "torch_neuronx")}
    assert not offenders, offenders


def _module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_ray_is_imported_only_when_a_cluster_is_asked_for():
    """One instance (make run) never loads Ray: only executor_service/cluster/ uses it,
    inside the functions that run once --ray-address is given, and nothing outside that
    package imports its dispatcher at module level."""
    service = REPO / "executor_service"
    top = {f"{p.relative_to(REPO)}: {m}" for p in service.rglob("*.py")
           for m in _module_level_imports(p) if m.split(".")[0] == "ray"}
    assert not top, top
    users = {str(p.relative_to(service)) for p in service.rglob("*.py")
             if any(m.split(".")[0] == "ray" for m in _imports(p))}
    assert users <= {"cluster/pool.py", "cluster/node_pool.py"}, users
    loaders = {str(p.relative_to(REPO)) for p in service.rglob("*.py") if p.parent.name != "cluster"
               for m in _module_level_imports(p)
               if m in ("executor_service.cluster.pool", "executor_service.cluster.node_pool")}
    assert not loaders, loaders


def test_the_services_process_never_imports_what_runs_in_the_pools_children():
    """warm_pool/child/ runs only in the template and the jobs' processes; the service
    and the supervisor's side of the pool reach it by module name and socket alone."""
    parent = [p for p in (REPO / "warm_pool").rglob("*.py") if "child" not in p.relative_to(REPO).parts
              and "job_helpers" not in p.relative_to(REPO).parts]
    parent += list((REPO / "executor_service").rglob("*.py"))
    offenders = {f"{p.relative_to(REPO)}: {m}" for p in parent for m in _imports(p)
                 if m == "warm_pool.child" or m.startswith("warm_pool.child.")}
    assert not offenders, offenders
    assert (REPO / "warm_pool" / "child" / "template.py").is_file()
