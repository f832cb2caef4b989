"""The import contract (DESIGN.md §2): imports run one way, and no file imports one that imports it back.

Layers, lowest first. A module may import modules of a lower layer and of its own unit; never a
unit of the same or a higher layer. Every import counts: at module level, inside functions and
under ``TYPE_CHECKING``. A unit is a tuple of module prefixes ("=" marks an exact name).
"""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent_runtime", "memory", "privacy", "server")

Graph = dict[str, dict[str, int]]  # module -> {imported module: line}

LAYERS: list[tuple[str, list[tuple[str, ...]]]] = [
    (
        "the foundation",
        [("=agent_runtime", "agent_runtime.errors", "agent_runtime.files", "agent_runtime.layout")],
    ),
    ("the libraries", [("memory",), ("privacy",)]),
    (
        "shared types",
        [("agent_runtime.config",), ("agent_runtime.protocol",), ("agent_runtime.metrics",)],
    ),
    ("the model families", [("agent_runtime.models",)]),
    ("the engine and training", [("agent_runtime.engine",), ("agent_runtime.training",)]),
    ("the sessions", [("agent_runtime.sessions",)]),
    ("the edges", [("server",), ("agent_runtime.client",)]),
    ("the entry points", [("agent_runtime.cli", "agent_runtime.__main__", "agent_runtime.bench")]),
]
# Above the model seam nothing imports a model family's own modules (only agent_runtime.models).
ABOVE_SEAM = ("agent_runtime.engine", "agent_runtime.sessions", "server", "agent_runtime.client")
FAMILIES = ("agent_runtime.models.byte", "agent_runtime.models.llama")


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(
    name: str, source: str, known: set[str], *, package: bool = False
) -> Iterator[tuple[str, int]]:
    """Our modules that module ``name`` imports, with line numbers (relative imports resolved)."""
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import x`` runs pkg/__init__.py first: an edge to pkg as well as to pkg.x.
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def project_graph() -> Graph:
    files = module_files()
    known = set(files)
    # CPython 3.11's ast.parse raises SystemError ("AST constructor recursion depth mismatch") when
    # a garbage collection inside it runs a finalizer that warns (a socket an earlier, failed test
    # leaked). Collect first and parse with the collector off, so this test judges only the imports.
    gc.collect()
    gc.disable()
    try:
        return {
            m: dict(
                imports_of(m, p.read_text(encoding="utf-8"), known, package=p.name == "__init__.py")
            )
            for m, p in files.items()
        }
    finally:
        gc.enable()


def unit_of(module: str) -> tuple[int, tuple[str, ...]]:
    best: tuple[int, tuple[str, ...], int] | None = None
    for layer, (_name, units) in enumerate(LAYERS):
        for unit in units:
            for prefix in unit:
                exact, bare = prefix.startswith("="), prefix.lstrip("=")
                matches = module == bare or (not exact and module.startswith(bare + "."))
                if matches and (best is None or len(bare) > best[2]):
                    best = (layer, unit, len(bare))
    assert best is not None, f"{module} is in no layer of tests/test_imports.py: add it"
    return best[0], best[1]


def violations(graph: Graph) -> list[str]:
    bad = []
    for module, deps in graph.items():
        layer, unit = unit_of(module)
        for dep, line in deps.items():
            dep_layer, dep_unit = unit_of(dep)
            if dep_unit != unit and dep_layer >= layer:
                bad.append(
                    f"{module}:{line} imports {dep}: {LAYERS[layer][0]} may not import "
                    f"{'a sibling in ' if dep_layer == layer else ''}{LAYERS[dep_layer][0]}"
                )
        if module.startswith(ABOVE_SEAM):
            bad += [
                f"{module}:{line} imports {dep}: use the model seam (agent_runtime.models)"
                for dep, line in deps.items()
                if dep.startswith(FAMILIES)
            ]
    return bad


def cycles(graph: Graph) -> list[list[str]]:
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
        for w in graph.get(v, {}):
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    for module in project_graph():
        unit_of(module)


def test_imports_run_one_way() -> None:
    bad = violations(project_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_file_level_cycle() -> None:
    assert cycles(project_graph()) == []


def test_the_contract_catches_what_it_forbids() -> None:
    known = {"memory.bank", "privacy.noise", "agent_runtime.models.byte.model", "server.app"}
    upward = dict(imports_of("memory.bank", "def f():\n    from privacy.noise import x\n", known))
    assert upward == {"privacy.noise": 2}
    assert violations({"memory.bank": upward}) != []
    seam = {"server.app": {"agent_runtime.models.byte.model": 1}}
    assert any("model seam" in v for v in violations(seam))
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    relative = dict(imports_of("memory.bank", "from .index import FlatKeys\n", {"memory.index"}))
    assert relative == {"memory.index": 1}
