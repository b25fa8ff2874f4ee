"""The import structure: no circle, and data flows one way (nothing below imports what is above it).

The graph is read from the source (every `import` that runs, at module level or inside a function; imports under
`if TYPE_CHECKING:` only name types and are left out), between the project's own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lower layers first; a module may import its own layer and the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("apbv.errors", "apbv.metrics", "apbv.config", "apbv.run_record"),
    ("apbv.comm", "apbv.thread_comm", "apbv.video", "apbv.attention"),
    ("apbv.inputs", "apbv.footage", "apbv.synthetic"),
    ("apbv.model",),
    ("apbv.engine",),
    ("apbv.qa", "apbv.cli", "apbv.__main__"),
    ("apbv.train",),
    ("apbv.bench",),
    ("ui",),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("apbv/**/*.py"), *ROOT.glob("ui/**/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that execute (those under `if TYPE_CHECKING:` do not)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py")


def test_every_module_has_a_layer():
    for module in import_graph():
        if module not in ("apbv", "ui"):
            _layer(module)


def test_no_import_runs_back_up():
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m not in ("apbv", "ui") and t not in ("apbv", "ui") and _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_import_circle():
    graph, state, circles = import_graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert circles == []
