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


# Every module of the package, bottom to top. The core defines what it needs of the server (`connection`) and never
# imports the server's adapter: `uvicorn_glue` and `uvicorn_protocol` sit above everything that uses them, wired in by
# `app` (embedding) and `server` (standalone). A module missing here fails the test: rank it when you add it.
RANKS: dict[str, int] = {
    # the message and its settings
    "service.version": 0, "service.config": 0, "service.keys": 0, "service.message": 0, "service.wire": 0, "service.logs": 0,
    "service.tasks": 0, "service.clients": 0, "service.headers": 0, "service.errors": 0, "service.limits": 0, "service.tokens": 0,
    # what the core needs of the server, and the brokers
    "service.connection": 1, "service.worker_metrics": 1,
    "service.broker": 2, "service.broker.base": 2, "service.broker.memory": 2, "service.broker.redis": 2,
    "service.broker.redis_commands": 2, "service.broker.redis_connect": 2, "service.broker.redis_errors": 2, "service.broker.redis_format": 2,
    "service.broker.redis_multiplex": 2, "service.broker.redis_reader": 2, "service.broker.redis_topology": 2,
    "service.broker.redis_wire": 2, "service.broker.redis_sentinel": 2, "service.broker.redis_link": 2,
    "service.broker.redis_store": 2, "service.broker.redis_cursors": 2,
    "service.broker.redis_routing": 2,
    # the instance's fan-out and its node
    "service.subscriber": 3, "service.hub": 4, "service.metrics": 4, "service.presence": 4, "service.ratelimit": 4,
    "service.auth": 4, "service.cors": 4, "service.publisher": 4, "service.hooks": 4, "service.control": 5,
    "service.sse": 5,  # the responses (the relay resets sse-starlette's exit flag when it starts)
    "service.relay": 6,
    # the HTTP surface
 "service.stream": 7, "service.openapi": 7, "service.access": 7, "service.api": 8, "service.admin": 8,
    # adapters: the server's, and the compositions that wire them in
    "service.uvicorn_glue": 9, "service.edge": 9, "service.uvicorn_protocol": 10, "service.http11": 10, "service.app": 11,
    "service.server": 12, "service.workers": 13, "service.cli": 14, "service.__main__": 15, "service": 16,
}


def test_every_module_is_ranked_and_imports_only_its_own_rank_or_below() -> None:
    graph = import_graph()
    modules = set(_modules())
    assert modules - set(RANKS) == set(), "rank the new modules in RANKS"
    wrong = [(a, b) for a, targets in graph.items() for b in targets
             if a in RANKS and b in RANKS and RANKS[b] > RANKS[a]]
    assert wrong == [], f"imports going up the layers: {wrong}"


def test_no_core_module_imports_the_servers_adapter() -> None:
    graph = import_graph()
    adapters = {"service.uvicorn_glue", "service.uvicorn_protocol", "service.http11"}
    core = {m for m, rank in RANKS.items() if rank <= RANKS["service.api"]}
    reach = {m: _reachable(graph, m) for m in core}
    assert {m: sorted(r & adapters) for m, r in reach.items() if r & adapters} == {}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen
