"""The import graph of deltatune's own modules, read from the source (nothing is imported).

    python tools/import_graph.py        # counts, module cycles, package cycles
    python tools/import_graph.py -v     # also every function-local import of our own modules

An edge is a ``top`` edge when the import runs with the module (module level, class bodies, ``try``
blocks), a ``local`` edge when it sits inside a function (runs on first call). Imports under
``if TYPE_CHECKING:`` are no edges. A module-level cycle through top edges can fail at import time;
cycles that need local edges are the ones those imports were written to hide. Packages are the first two
name components (``deltatune.methods``), and the package graph counts both kinds of edge.
``tests/test_import_graph.py`` keeps both in check.
"""
from __future__ import annotations

import ast
import collections
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass(frozen=True)
class ImportGraph:
    """Modules and the import edges among them."""

    modules: tuple[str, ...]
    """Every module under ``src/``, dotted (a package is its ``__init__``)."""
    top: dict[str, frozenset[str]]
    """module -> modules it imports when it is imported."""
    local: dict[str, frozenset[str]]
    """module -> modules it imports inside functions."""

    def both(self) -> dict[str, set[str]]:
        """module -> every module it imports, top or local."""
        return {m: set(self.top[m]) | set(self.local[m]) for m in self.modules}

    def module_cycles(self, include_local: bool = False) -> list[list[str]]:
        """Strongly connected components of more than one module (each a cycle or several)."""
        return strongly_connected(self.both() if include_local else self.top, self.modules)

    def package_graph(self) -> dict[str, set[str]]:
        """package -> the other packages its modules import (top or local)."""
        edges: dict[str, set[str]] = collections.defaultdict(set)
        for m, targets in self.both().items():
            for t in targets:
                if package(m) != package(t):
                    edges[package(m)].add(package(t))
        return edges

    def package_cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one package, top and local edges counted."""
        return strongly_connected(self.package_graph(), sorted({package(m) for m in self.modules}))


def package(module: str) -> str:
    """``deltatune.methods.lora`` -> ``deltatune.methods``; ``deltatune`` -> ``deltatune``."""
    return ".".join(module.split(".")[:2])


def _module_names(src: Path, root: str) -> dict[str, Path]:
    mods = {}
    for path in (src / root).rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The modules of ``mods`` one import statement names (``from pkg import sub`` names ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods and name != module:
            out.append(name)
    return out


def build(src: Path = SRC, root: str = "deltatune") -> ImportGraph:
    """Read every module of package ``root`` under ``src`` and collect its import edges."""
    mods = _module_names(src, root)
    top: dict[str, set[str]] = {m: set() for m in mods}
    local: dict[str, set[str]] = {m: set() for m in mods}

    for module, path in mods.items():
        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    (local if in_function else top)[module].update(_targets(module, path, child, mods))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text()), False)
    names = tuple(sorted(mods))
    return ImportGraph(names, {m: frozenset(top[m]) for m in names}, {m: frozenset(local[m]) for m in names})


def strongly_connected(edges: dict[str, set[str]] | dict[str, frozenset[str]], nodes) -> list[list[str]]:
    """Tarjan's algorithm; components of one node are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(out)


def main(argv: list[str]) -> int:
    graph = build()
    print(f"modules {len(graph.modules)}, top edges {sum(map(len, graph.top.values()))}, "
          f"local-import edges {sum(map(len, graph.local.values()))}")
    print("module cycles (top edges):", graph.module_cycles())
    print("module cycles (top + local edges):", graph.module_cycles(include_local=True))
    print("package cycles (top + local edges):", graph.package_cycles())
    if "-v" in argv:
        for m in graph.modules:
            for t in sorted(graph.local[m]):
                print(f"  local {m} -> {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
