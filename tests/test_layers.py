"""The package's imports go one way: no module imports, even indirectly, a module that imports it back.

Every import counts: top-level, inside functions, and under `TYPE_CHECKING`. Layers, bottom to top:
config (with keys, message, wire) → broker → hub/subscriber → relay → stream/sse/api → app → server → __main__.
`from . import x` counts as importing the module `x` (the package itself is the public namespace, re-exported by
`service/__init__.py`, and imports nothing of its submodules' own back).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from .support import ROOT

PACKAGE = ROOT / "service"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
                targets = submodules or [target]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(_modules()):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    detail = {m: sorted(t for t in graph[m] if t in c) for c in found for m in c}
    assert found == [], f"import cycles: {found}; edges inside them: {detail}"


def test_the_graph_is_read_right() -> None:
    """A cycle planted in a copy of the graph is found (the test above cannot pass by reading nothing)."""
    graph = import_graph()
    assert "service.broker.base" in graph["service.broker.redis"]
    assert "service.message" in graph["service.hub"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["service.message"].add("service.hub")
    assert any({"service.hub", "service.message"} <= set(c) for c in cycles(planted))


def test_layers_only_import_downward() -> None:
    """The main layers, checked edge by edge: nothing below imports anything above."""
    order = ["service.config", "service.broker", "service.hub", "service.relay", "service.stream", "service.api",
             "service.app", "service.server", "service.__main__"]
    rank = {name: i for i, name in enumerate(order)}
    graph = import_graph()
    wrong = [(a, b) for a, targets in graph.items() for b in targets
             if a in rank and b in rank and rank[b] > rank[a]]
    assert wrong == [], f"imports going up the layers: {wrong}"


def test_the_embedded_default_loads_no_redis_client() -> None:
    """`import service` and building the app with no REDIS_URL load neither redis-py nor hiredis."""
    code = ("import sys; from service import Settings, create_app; create_app(Settings.from_env({}));"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
