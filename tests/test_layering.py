"""Imports inside autorank go one way: the layer map of issue #18, checked statically.

Every module of the package is parsed with ``ast``; every import counts (also one
inside a function), except those under ``if TYPE_CHECKING:``.  A module may import
its own layer or a lower one, never a higher one, and never so as to close a cycle.
:func:`test_layering` lists every broken rule at once:

(a) an import of a higher layer;
(b) a cycle among autorank modules (a package ``__init__`` may import its own
    submodules only if they do not import the ``__init__`` back: a submodule imports
    the sibling module that defines a name, not the package);
(c) ``from autorank.x import _name`` of another module's private name (a private
    *module*, ``from autorank import _util``, is fine);
(d) a module missing from :data:`LAYERS` (a new module must be placed);
(e) an import of a deprecated alias module (:data:`ALIASES`) from inside autorank;
(f) a family file importing another family file (shared code lives in
    ``families/base.py``, ``families/conv.py``, ``families/memo.py``, ``modules.py`` or ``linalg.py``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autorank"

# The layers, lowest first.  Names are relative to ``autorank``; ``__init__`` is
# ``autorank/__init__.py``; a package name (``families``) also places every module
# inside it (``families.base``, ``families.alds``, ...).
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("progress", "_util", "nested", "validate", "registry", "linalg", "solver", "plan", "config"),  # leaves
    1: ("measures", "vbmf"),  # maths
    2: ("layers", "graph", "calibration", "latency"),  # model analysis
    3: ("modules", "families"),  # families
    4: ("curves", "allocators"),  # allocation
    5: ("realize", "sequential", "stream", "pipeline", "result", "io"),  # pipeline
    6: ("retrain", "refine", "finetune", "distill"),  # workflows
    7: ("api", "__init__"),  # front door
    8: ("apps",),  # applications: the core never imports them
}

# Deprecated alias modules (old path -> new path).  They sit with the applications
# (layer 8) and nothing inside autorank may import them.
ALIASES: dict[str, str] = {
    "autorank.sweep": "autorank.apps.sweep",
    "autorank.cli": "autorank.apps.cli",
    "autorank.plots": "autorank.apps.plots",
    "autorank.text": "autorank.apps.text",
    "autorank.zoo": "autorank.apps.zoo",
    "autorank.baselines": "autorank.allocators",
    "autorank.errors": "autorank.measures",
}
# aliases that gather names from several new modules (each has its own test)
GATHERED = frozenset({"autorank.baselines"})
ALIAS_LAYER = 8

# Modules of the families package that every family file may import.
FAMILY_SHARED = ("autorank.families", "autorank.families.base", "autorank.families.conv", "autorank.families.memo")

# ``import autorank`` must not load any of these (nor a submodule of one).
HEAVY = ("autorank.apps", "matplotlib", "transformers", "optuna", "tensorly")


@dataclass(frozen=True)
class Import:
    """One imported name (or module) of one import statement."""

    module: str  # the importing module
    line: int
    text: str  # the statement, as written
    target: str  # the autorank module it loads
    name: str | None  # the name taken from ``target`` by ``from target import name``, if not a module

    def where(self) -> str:
        return f"{self.module}:{self.line} `{self.text}`"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST):
    """Every import statement of ``tree``, at any depth, except inside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """The imports of ``module`` that load an autorank module, one per imported name."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in sorted(_statements(tree), key=lambda n: (n.lineno, n.col_offset)):
        text = ast.unparse(node)
        if isinstance(node, ast.Import):
            out += [Import(module, node.lineno, text, a.name, None) for a in node.names
                    if a.name == "autorank" or a.name.startswith("autorank.")]
            continue
        base = _base(module, is_package, node)
        if base != "autorank" and not base.startswith("autorank."):
            continue
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in known:  # from package import submodule
                out.append(Import(module, node.lineno, text, sub, None))
            else:
                out.append(Import(module, node.lineno, text, base, a.name))
    return out


def layer_of(module: str) -> int | None:
    if module in ALIASES:
        return ALIAS_LAYER
    rel = module.split(".")[1:] or ["__init__"]
    for i in range(len(rel), 0, -1):  # the longest listed prefix: families.base, then families
        key = ".".join(rel[:i])
        for layer, names in LAYERS.items():
            if key in names:
                return layer
    return None


def shortest_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """For every import edge that lies on a cycle, the shortest cycle through it (each cycle once, from its least module).

    Every edge that could be cut to break a cycle is named, without listing the
    exponentially many longer cycles that ``nx.simple_cycles`` would.
    """
    cycles = set()
    for component in nx.strongly_connected_components(graph):
        sub = graph.subgraph(component)
        for a, b in sub.edges:
            ring = [a] + nx.shortest_path(sub, b, a)[:-1]
            start = ring.index(min(ring))
            cycles.add(tuple(ring[start:] + ring[:start]))
    return [list(c) for c in sorted(cycles)]


def violations() -> list[str]:
    modules = package_modules()
    known = set(modules)
    found: list[str] = []
    listed = [n for names in LAYERS.values() for n in names]
    found += [f"LAYERS lists {n!r} more than once" for n in sorted({n for n in listed if listed.count(n) > 1})]
    found += [f"(d) {m} ({modules[m].relative_to(ROOT)}) is in no layer: add it to LAYERS in tests/test_layering.py"
              for m in sorted(known) if layer_of(m) is None]
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module in sorted(modules):
        for imp in imports_of(module, modules[module], known):
            if imp.target not in known:
                found.append(f"{imp.where()}: {imp.target} is not a module of autorank")
                continue
            if imp.target == module:
                continue
            graph.add_edge(module, imp.target)
            graph.edges[module, imp.target].setdefault("imp", imp)
            mine, theirs = layer_of(module), layer_of(imp.target)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(f"(a) {imp.where()}: layer {mine} imports {imp.target} of the higher layer {theirs}")
            if imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__"):
                found.append(f"(c) {imp.where()}: imports the private name {imp.name} of {imp.target}; "
                             f"make it public in the lower module")
            if imp.target in ALIASES and module not in ALIASES:
                found.append(f"(e) {imp.where()}: imports the deprecated alias {imp.target}; "
                             f"import {ALIASES[imp.target]}")
            if (module.startswith("autorank.families.") and imp.target.startswith("autorank.families.")
                    and module not in FAMILY_SHARED and imp.target not in FAMILY_SHARED):
                found.append(f"(f) {imp.where()}: a family file imports another family file; "
                             "move the shared code to families/base.py or families/conv.py")
    for cycle in shortest_cycles(graph):
        hops = [graph.edges[a, b]["imp"] for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        found.append(f"(b) cycle {' -> '.join(cycle + cycle[:1])}: " + "; ".join(h.where() for h in hops))
    return list(dict.fromkeys(found))  # one line per statement and rule


def test_layering():
    found = violations()
    assert not found, f"{len(found)} layering violation(s):\n" + "\n".join(found)


def test_import_autorank_is_light():
    code = "import json, sys, autorank; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY) or m in ALIASES]
    assert not heavy, f"import autorank loads {heavy}"
