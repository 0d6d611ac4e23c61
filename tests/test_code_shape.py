"""The code's shape, checked statically: which rooms may import which, and no import cycles between llmsh modules
(imports inside functions count: a cycle there is a cycle a newcomer has to untangle all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmsh"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """llmsh module → the llmsh modules it imports (anywhere in the file)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                       for n in ast.walk(block)}  # imports for the type checker only: not run, not a cycle
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("llmsh") and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = imports()
    # a package's __init__ importing its own submodules lazily is not a cycle a reader has to untangle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert _cycles(graph) == []


def _reaches(graph: dict[str, set[str]], start: str, prefix: str) -> list[str]:
    return sorted(t for t in graph[start] if t == prefix or t.startswith(prefix + "."))


def test_rooms_import_only_what_they_may() -> None:
    graph = imports()
    bad = []
    for name in graph:
        if name.startswith("llmsh.kernel"):
            bad += [(name, t) for t in _reaches(graph, name, "llmsh.commands")]
            bad += [(name, t) for t in _reaches(graph, name, "llmsh.engine")]
        if name.startswith("llmsh.commands"):
            bad += [(name, t) for t in _reaches(graph, name, "llmsh.tui")]
            bad += [(name, t) for t in _reaches(graph, name, "llmsh.engine")]
    assert bad == []


def test_front_and_clients_never_import_torch() -> None:
    rooms = ("llmsh/kernel", "llmsh/client", "llmsh/protocol", "llmsh/tui", "llmsh/commands")
    bad = []
    for room in rooms:
        for path in (ROOT.parent / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                bad += [f"{path.relative_to(ROOT.parent)}: {n}" for n in names if n.split(".")[0] in ("torch", "transformers")]
    assert bad == []
