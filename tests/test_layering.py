"""The floors of the house and the one-way import rule (docs/design.md, "Floors"), read from
the source with `ast`:

    config <- protocol <- store <- tasks <- app        workers -> config, protocol, store

`tasks` imports `workers` only inside functions (the GPU worker process starts the engine);
nothing imports `benchmarks`; no import circle anywhere, lazy imports included; the web
side and the scheduler load no torch; no file on a floor is over 400 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "protocol", "store", "tasks", "app", "workers", "benchmarks")
FLOOR = {"config": 0, "protocol": 1, "store": 2, "tasks": 3, "app": 4}
# What each package may import of the project, besides itself.
ALLOWED = {
    "config": set(),
    "protocol": {"config"},
    "store": {"config", "protocol"},
    "tasks": {"config", "protocol", "store"},  # + workers, lazily (see LAZY)
    "app": {"config", "protocol", "store", "tasks"},
    "workers": {"config", "protocol", "store"},
    "benchmarks": {"config", "protocol", "store", "workers"},
}
LAZY = {"tasks": {"workers"}}  # allowed only inside a function
# Process entry points sit above every floor: `python -m workers` builds the Celery worker
# (tasks) around the engine.
ENTRY_POINTS = {"workers.__main__"}
FORBIDDEN_LIBS = {
    "protocol": {"flask", "sqlalchemy", "torch", "celery"},
    "store": {"flask", "torch", "celery"},
    "tasks": {"flask"},
    "app": {"torch"},
}
NO_TORCH_MODULES = {"workers.scheduler"}
MAX_LINES = 400
# Files that are one Triton program each (or a launcher with its one kernel) may stand alone.
LONG_FILES_ALLOWED: set[str] = set()


@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a project module, or a top-level third-party package
    line: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The project module `name` means (a module, else its nearest package), or the
    third-party top-level package."""
    if name.split(".")[0] not in PACKAGES:
        return name.split(".")[0]
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def edges_of(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Edge] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append(Edge(module, _resolve(alias.name, modules), child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                base = _base(module, path, child)
                for alias in child.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    out.append(Edge(module, _resolve(target, modules), child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return [e for e in out if e.target != module]


def all_edges() -> list[Edge]:
    modules = project_modules()
    return [e for m, p in modules.items() for e in edges_of(m, p, modules)]


def floor_violations(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = e.source.split(".")[0], e.target.split(".")[0]
        if e.source in ENTRY_POINTS or dst not in PACKAGES or dst == src:
            continue
        if dst in ALLOWED[src] or (e.lazy and dst in LAZY.get(src, set())):
            continue
        bad.append(f"{e.source}:{e.line} imports {e.target}")
    return bad


def library_violations(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src = e.source.split(".")[0]
        forbidden = FORBIDDEN_LIBS.get(src, set())
        if e.source in NO_TORCH_MODULES:
            forbidden = forbidden | {"torch", "triton", "numpy"}
        if e.target in forbidden and not (src == "tasks" and e.lazy):
            bad.append(f"{e.source}:{e.line} imports {e.target}")
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Every import circle among project modules (one representative path each)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.target.split(".")[0] in PACKAGES:
            graph.setdefault(e.source, set()).add(e.target)
    found, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return found


def test_imports_go_one_way_down_the_floors():
    assert floor_violations(all_edges()) == []


def test_no_import_circles():
    assert cycles(all_edges()) == []


def test_web_side_loads_no_torch_and_the_scheduler_no_tensor_library():
    assert library_violations(all_edges()) == []


def test_files_on_the_floors_are_short():
    long = {
        module: n
        for module, path in project_modules().items()
        if module.split(".")[0] in FLOOR.keys() | {"workers"}
        and (n := len(path.read_text().splitlines())) > MAX_LINES
        and module not in LONG_FILES_ALLOWED
    }
    assert long == {}


def test_the_checker_sees_what_it_must(tmp_path):
    """The rules catch a floor crossing, a lazy circle and a forbidden library."""
    edges = [
        Edge("store.db", "app.factory", 1, False),
        Edge("tasks.tinker", "workers.engine", 2, True),
        Edge("workers.a", "workers.b", 3, True),
        Edge("workers.b", "workers.a", 4, False),
        Edge("protocol.wire", "torch", 5, False),
        Edge("workers.scheduler", "torch", 6, True),
    ]
    assert floor_violations(edges) == ["store.db:1 imports app.factory"]
    assert cycles(edges) == [["workers.a", "workers.b", "workers.a"]]
    assert library_violations(edges) == [
        "protocol.wire:5 imports torch",
        "workers.scheduler:6 imports torch",
    ]
