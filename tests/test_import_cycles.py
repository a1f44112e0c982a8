"""The package's modules import one way: no module reaches itself again through its imports.

Imports are read from the source (with `ast`), lazy ones inside functions included: a circle hidden in a function
still ties the modules together. Imports only for type checkers (`if TYPE_CHECKING:`) are left out. Importing
`a.b.c` runs the packages `a.b` and `a` first, so it counts as an import of those too (except the importer's own
packages, which are already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "hf_eagle3"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SOURCE / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules (or module attributes) `module` imports, outside `if TYPE_CHECKING:`."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}
        edges = set()
        for name in _imported_names(ast.parse(path.read_text()), module, is_package):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in files and prefix not in own_packages and prefix != module:
                    edges.add(prefix)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_detector_finds_a_circle_and_its_members():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    source = "from typing import TYPE_CHECKING\nfrom . import y\nif TYPE_CHECKING:\n    from .z import Z\ndef f():\n    from ..w import v\n"
    assert _imported_names(ast.parse(source), "p.q.x", is_package=False) >= {"p.q", "p.q.y", "p.w", "p.w.v"}
    assert not {name for name in _imported_names(ast.parse(source), "p.q.x", False) if name.startswith("p.q.z")}


def test_decoding_is_in_no_import_circle():
    graph = import_graph()
    assert "hf_eagle3.decoding.tree_loop" in graph and graph["hf_eagle3.decoding.dispatch"]
    cycles = [cycle for cycle in find_cycles(graph) if any(".decoding" in module for module in cycle)]
    assert not cycles, cycles


def test_the_package_has_no_import_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles (each list imports itself through its members):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize(
    "module, forbidden",
    [("hf_eagle3.modeling_eagle3", "hf_eagle3.data"), ("hf_eagle3.modeling_eagle3", "hf_eagle3.decoding")],
)
def test_modeling_does_not_reach_into_data_or_decoding(module, forbidden):
    graph = import_graph()
    reached, todo = set(), [module]
    while todo:
        for successor in graph[todo.pop()] - reached:
            reached.add(successor)
            todo.append(successor)
    assert not {name for name in reached if name == forbidden or name.startswith(forbidden + ".")}
