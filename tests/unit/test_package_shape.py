"""The package's shape: no import cycle between sd35trt's modules, no module over 600 lines.

Imports are read with ``ast`` from the source, function-level and ``if TYPE_CHECKING:`` ones
included (a cycle that only closes at call time, or only in the types, is still a cycle in the
design). The implicit import of a module's parent package is not an edge (a package ``__init__``
that re-exports its submodules, like ``sd35trt.stages.export`` and ``sd35trt.serve``, is a facade,
not their dependency).

The package is layered: a module imports only modules of its own layer or lower ones (:data:`LAYERS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sd35trt"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The sd35trt module an import of ``name`` loads (``a.b.c`` may be module ``a.b``'s attribute c)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


#: The layers, lowest first: the shared vocabulary, what stages write and read back, the PyTorch
#: models, engine backends, the runtime, the stages, the services around the runtime, the verbs.
LAYERS = (
    ("sd35trt", "sd35trt.errors"),
    (
        "sd35trt.config",
        "sd35trt.controlnet_settings",
        "sd35trt.component_table",
        "sd35trt.components",
        "sd35trt.model_dims",
        "sd35trt.sampling",
        "sd35trt.guidance",
        "sd35trt.console",
        "sd35trt.metrics",
    ),
    ("sd35trt.artifacts",),
    ("sd35trt.models",),
    ("sd35trt.backends",),
    ("sd35trt.runtime",),
    ("sd35trt.stages",),
    ("sd35trt.serve", "sd35trt.triton", "sd35trt.bench"),
    ("sd35trt.compare", "sd35trt.info", "sd35trt.run", "sd35trt.cli"),
)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix naming ``module`` (a module or its package)."""
    found = [
        (len(prefix), i)
        for i, group in enumerate(LAYERS)
        for prefix in group
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert found, f"{module} is in no layer: add it to LAYERS"
    return max(found)[1]


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth, ``if TYPE_CHECKING:`` bodies included."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def import_graph() -> dict[str, set[str]]:
    """``module -> sd35trt modules it imports`` (at any scope)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from a import b` loads module a.b when there is one, else takes b from a
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_finder_sees_function_level_and_relative_cycles():
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({**graph, "p.c": set()}) is None


def test_the_graph_holds_function_level_and_type_checking_imports():
    graph = import_graph()
    # cli imports every stage inside its commands only
    assert {"sd35trt.stages.calibrate", "sd35trt.stages.build", "sd35trt.run"} <= graph["sd35trt.cli"]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
        "def f():\n    import c\n"
    )
    assert sorted(n.names[0].name for n in _imports(tree) if isinstance(n, ast.Import)) == ["a", "b", "c"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    assert (
        layer_of("sd35trt.stages.export.tracing") == layer_of("sd35trt.stages") > layer_of("sd35trt.runtime")
    )
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_no_module_is_over_600_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"
