"""Imports point down: every module's imports (module-level and inside functions, read with `ast`, never run)
go only to its own package, to a lower layer, or along one of the few sideways edges written down below with
their reason; and the packages form no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each package of the project: a package may import a package of a lower layer. tests/ may import
# everything and nothing may import it.
LAYERS = {
    "agent": 3, "bench": 3,  # command lines and benchmark scripts
    "actors": 2, "learner": 2, "tasks": 2,  # what runs: acting, learning, the supervised data
    "models": 1,  # networks and the update rules' dispatch
    "cuda_ext": 0,  # kernels: below models, which chooses them; they never import models
    "runio": 0, "configs": 0,  # run files and YAML defaults: import nothing of the project
}

# Imports between packages of the same layer, each one a step of the flow.
SIDEWAYS = {
    ("bench", "agent"): "the benchmarks time the runs the command lines start: same config resolver "
    "(agent.config) and the same aggregates (agent.report)",
    ("learner", "actors"): "the RL learner consumes actors' unrolls (actors.unroll) and runs the actor pool on "
    "Ray (actors.actor, actors.cluster, actors.envs)",
    ("learner", "tasks"): "the supervised learner trains and evaluates on the task data sets (tasks.data, "
    "tasks.wikitext)",
}


def project_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"tests"}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # a relative import stays inside the package of the file that makes it
            found.append((node.lineno, package if node.level else node.module))
    return found


def package_imports() -> list[tuple[str, str, str]]:
    """(importing package, imported package, "file:line module") for every import between two project
    packages."""
    packages = project_packages()
    edges = []
    for package in sorted(packages):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imported_modules(path, package):
                target = module.split(".")[0]
                if target in packages and target != package:
                    edges.append((package, target, f"{path.relative_to(ROOT)}:{line} imports {module}"))
    return edges


def layering_violations(edges: list[tuple[str, str, str]]) -> list[str]:
    bad = []
    for source, target, where in edges:
        if target == "tests":
            bad.append(f"{where}: nothing outside tests/ may import the tests")
        elif source == "tests":
            continue
        elif source not in LAYERS or target not in LAYERS:
            bad.append(f"{where}: package {source if source not in LAYERS else target} has no layer in LAYERS")
        elif LAYERS[target] > LAYERS[source] or (
            LAYERS[target] == LAYERS[source] and (source, target) not in SIDEWAYS
        ):
            bad.append(f"{where}: {source} (layer {LAYERS[source]}) may not import {target} "
                       f"(layer {LAYERS[target]}); move the shared code down")
    return bad


def package_cycle(edges: list[tuple[str, str, str]]) -> list[str] | None:
    """One cycle of the package graph as [a, b, ..., a], or None."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:  # path: the depth-first path, ending at node
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_every_package_has_a_layer():
    assert project_packages() - {"tests"} == set(LAYERS)


def test_imports_point_down():
    edges = package_imports()
    assert edges, "no imports between packages found: the scan reads nothing"
    assert layering_violations(edges) == []
    # every sideways edge written down is one the code uses: none stays allowed after it is gone
    used = {(source, target) for source, target, _ in edges}
    assert set(SIDEWAYS) <= used, f"unused sideways edges: {set(SIDEWAYS) - used}"


def test_no_cycle_between_packages():
    assert package_cycle(package_imports()) is None


def test_the_check_catches_an_upward_import_inside_a_function(tmp_path):
    """The scan sees a function-level import, a relative import stays in its package, and an upward or
    unlisted sideways import and a cycle are each reported."""
    module = tmp_path / "m.py"
    module.write_text("from . import sibling\n\ndef f():\n    from agent.config import merge_config\n")
    assert imported_modules(module, "actors") == [(1, "actors"), (4, "agent.config")]
    edges = [("actors", "agent", "actors/m.py:4 imports agent.config"),
             ("tasks", "actors", "tasks/x.py:1 imports actors.envs"),
             ("models", "cuda_ext", "models/ops/__init__.py:1 imports cuda_ext")]
    assert [v.split(":")[0] for v in layering_violations(edges)] == ["actors/m.py", "tasks/x.py"]
    assert package_cycle(edges) is None
    cycle = package_cycle(edges + [("cuda_ext", "models", "cuda_ext/cases.py:1 imports models")])
    assert cycle in (["models", "cuda_ext", "models"], ["cuda_ext", "models", "cuda_ext"])


@pytest.mark.parametrize("package", ["runio", "configs"])
def test_bottom_packages_import_nothing_of_the_project(package):
    assert [where for source, _, where in package_imports() if source == package] == []
