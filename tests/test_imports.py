"""lmforge's own modules import each other without cycles, and follow the layers of
docs/INTERFACES.md (a module never imports a higher layer).

The graph is read from the source with `ast`, so it counts every import statement wherever it
stands (inside functions too: an import moved into a function hides a cycle from Python but not
from this test), except those under `if TYPE_CHECKING:`, which never run. Relative imports are
resolved; `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# docs/INTERFACES.md: layer of each top-level module or package of lmforge
LAYERS = {
    "io": 0, "corpus": 0,
    "tokenizer": 1, "model": 1,
    "data": 2, "infer": 2,
    "train": 3, "prompting": 3, "eval": 3, "export": 3,
    "serve": 4, "pipeline": 4, "scaling": 4, "cli": 4,
    "__main__": 4,  # `python -m lmforge`: the CLI
}


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `src`."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules) -> str | None:
    """The longest prefix of dotted `name` that is one of `modules` (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (edges to itself left out)."""
    files = module_files(src, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin for alias in node.names]
            for target in targets:
                known = _known(target, files)
                if known is not None and known != module:
                    edges.add(known)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, iters = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_of(module: str) -> int | None:
    """The layer of an lmforge module; `lmforge` itself (the version) is layer 0."""
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else 0


def test_the_graph_reader_sees_hidden_and_relative_imports(tmp_path):
    """The machinery on a package made here: a cycle through an import inside a function and a
    relative `from . import name` is found; without it the graph is acyclic."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toy.a import f\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import a\n"
                                      "def g():\n    from .. import c\n")
    (pkg / "c.py").write_text("from toy.sub.b import g\n")
    graph = import_graph(tmp_path, "toy")
    # `from .sub import b` and `from .. import c` name modules; the TYPE_CHECKING import is left out
    assert graph == {"toy": {"toy.a"}, "toy.a": {"toy.sub.b"}, "toy.sub": set(), "toy.sub.b": {"toy.c"}, "toy.c": {"toy.sub.b"}}
    assert find_cycle(graph) == ["toy.sub.b", "toy.c", "toy.sub.b"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path, "toy")) is None


def test_lmforge_has_no_import_cycle():
    graph = import_graph(SRC, "lmforge")
    assert "lmforge.infer.engine" in graph and "lmforge.model.transformer" in graph
    assert "lmforge.infer.speculative" in graph["lmforge.infer.engine"]  # imports inside functions count too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lmforge_follows_the_layers_of_interfaces_md():
    graph = import_graph(SRC, "lmforge")
    unplaced = sorted({m.split(".")[1] for m in graph if layer_of(m) is None})
    assert not unplaced, f"lmforge.{unplaced[0]} has no layer: add it to docs/INTERFACES.md and LAYERS here"
    violations = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                  for m in sorted(graph) for t in sorted(graph[m])
                  if layer_of(t) > layer_of(m)]
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)
