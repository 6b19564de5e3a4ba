"""The repository's layering rules, checked on the source (no imports executed): tests/test_layers.py.

Layers, inner to outer:

    tapper          the ML core: knows nothing of ZenML, MLflow, Great Expectations, servers or pipelines
    deploy          the server; reads the core's bundle format (tapper/bundle.py), never the workflow
    materializers   ZenML artifact types and how they are stored
    data_quality    Great Expectations suites and the data-quality report (reads materializers' LampFiles)
    steps           thin ZenML steps around the core, grouped by stage; never the server
    pipelines       DAGs, stacks, the MLflow pyfunc model class and the ZenML-side CLI commands (outermost)

The CLI's outer commands come in through entry points (pyproject's `tapper.commands`), never by import.

An import is an edge whether it sits at module level or inside a function (a lazy import hides a dependency, it
does not remove it); imports under `if TYPE_CHECKING:` are not edges.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# package -> packages (and third-party roots) it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "tapper": (
        "steps",
        "pipelines",
        "deploy",
        "materializers",
        "data_quality",
        "zenml",
        "mlflow",
        "great_expectations",
        "fastapi",
        "uvicorn",
        "kubernetes",
    ),
    "data_quality": ("steps", "pipelines", "deploy", "zenml"),
    "deploy": ("steps", "pipelines", "materializers", "data_quality", "zenml"),
    "materializers": ("steps", "pipelines", "deploy"),
    "steps": ("pipelines", "deploy"),
}
PACKAGES = ("tapper", "deploy", "data_quality", "materializers", "steps", "pipelines")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module (a project module where it resolves to one, else the dotted name)
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        base = root / pkg
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                mods[module_name(root, path)] = path
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    edges = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            edges += [Edge(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                edges.append(Edge(name, sub if sub in modules else target, node.lineno))
    return edges


def import_graph(root: Path, packages=PACKAGES) -> dict[str, list[Edge]]:
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def violations(graph: dict[str, list[Edge]], rules=FORBIDDEN) -> list[str]:
    out = []
    for source, edges in graph.items():
        rule = rules.get(source.split(".")[0], ())
        for edge in edges:
            if edge.target.split(".")[0] in rule:
                out.append(f"{edge}: {source.split('.')[0]} must not import {edge.target.split('.')[0]}")
    return out


def cycles(graph: dict[str, list[Edge]], prefix: str = "") -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's algorithm."""
    nodes = [n for n in graph if n.startswith(prefix)]
    adj = {n: sorted({e.target for e in graph[n] if e.target in graph and e.target.startswith(prefix)}) for n in nodes}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # iterative version of Tarjan's recursion, deep packages overflow nothing
        work = [(v, iter(adj[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1 or node in adj[node]:
                        out.append(sorted(comp))

    for n in nodes:
        if n not in index:
            visit(n)
    return out
