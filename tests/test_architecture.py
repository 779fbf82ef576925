"""The architecture holds: layers point one way, no import cycle, headers tell the truth.

Read from the source (AST), function-local imports included, so a cycle cannot hide
behind a deferred import:

- ``src/peftflow`` is a stack of layers, each importing only itself and those before it;
- no two modules import each other, directly or through others;
- a function-local import of a project module says why on its line (``# deferred: ...``);
- every module's docstring ends with ``Depends on:`` naming the layers it imports;
- no module is over 500 lines (tests/test_package_boundaries.py keeps Prefect out).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "peftflow"
# Low to high. A module belongs to the first layer whose prefix it matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "peftflow",
            "peftflow.env",
            "peftflow.errors",
            "peftflow.fsutil",
            "peftflow.gitinfo",
            "peftflow.retry",
        ),
    ),
    ("config", ("peftflow.config",)),
    ("data", ("peftflow.data",)),
    ("checks", ("peftflow.checks",)),
    ("models", ("peftflow.models",)),
    ("training", ("peftflow.training",)),
    ("evaluation", ("peftflow.evaluation",)),
    ("tracking", ("peftflow.tracking",)),
    ("task", ("peftflow.task",)),
    ("serving", ("peftflow.serving",)),
    ("reporting", ("peftflow.reporting",)),
    ("pipeline", ("peftflow.pipeline",)),
    ("cli", ("peftflow.cli",)),
)
LAYER_NAMES = [name for name, _ in LAYERS]
MAX_MODULE_LINES = 500
DEFERRED = re.compile(r"#\s*deferred:\s*\S")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module
    line: int
    local: bool  # inside a function
    reason: bool  # carries a "# deferred: ..." comment


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """Foundation modules by name; every other module by its package."""
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or (name != "foundation" and module.startswith(prefix + ".")):
                return name
    raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")


def resolve(name: str) -> str | None:
    """The project module ``name`` refers to (an imported symbol -> its module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []
    for node, local in _import_nodes(tree):
        for name in _imported_names(node, module, path):
            target = resolve(name)
            if target and target != module:
                line = lines[node.lineno - 1]
                found.append(
                    Import(module, target, node.lineno, local, bool(DEFERRED.search(line)))
                )
    return found


def _import_nodes(tree: ast.AST):
    """Every import statement, with whether it sits inside a function (TYPE_CHECKING blocks
    are not imports at run time)."""

    def walk(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, local
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, inner)

    yield from walk(tree, False)


def _imported_names(node, module: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, node.module] if node.module else package)
    return [f"{base}.{alias.name}" for alias in node.names]


ALL_IMPORTS = [item for module in MODULES for item in imports_of(module)]


def test_every_module_is_in_a_layer():
    for module in MODULES:
        assert layer_of(module) in LAYER_NAMES


def test_layers_import_only_themselves_and_the_layers_before_them():
    upward = [
        f"{i.source} ({layer_of(i.source)}) imports {i.target} ({layer_of(i.target)}) at {i.line}"
        for i in ALL_IMPORTS
        if LAYER_NAMES.index(layer_of(i.target)) > LAYER_NAMES.index(layer_of(i.source))
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle_counting_function_local_imports():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for item in ALL_IMPORTS:
        graph[item.source].add(item.target)
    cycles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_a_function_local_import_of_a_project_module_says_why():
    silent = [f"{i.source}:{i.line} -> {i.target}" for i in ALL_IMPORTS if i.local and not i.reason]
    assert not silent, "add `# deferred: <why>` to these function-local imports:\n" + "\n".join(
        silent
    )


def declared_dependencies(module: str) -> set[str] | None:
    """The layers named after ``Depends on:`` in the module's docstring (its own excluded)."""
    docstring = ast.get_docstring(ast.parse(MODULES[module].read_text())) or ""
    match = re.search(r"Depends on:(.*?)(?:\n\n|$)", docstring, re.S)
    if match is None:
        return None
    named = {layer for layer in LAYER_NAMES[1:] if re.search(rf"\b{layer}\b", match.group(1))}
    return named - {layer_of(module)}


def actual_dependencies(module: str) -> set[str]:
    """The other layers a module imports; for a package, what its modules import together."""
    path = MODULES[module]
    members = [module]
    if path.name == "__init__.py" and module != "peftflow":  # the root is a module of its own
        members = [m for m in MODULES if m == module or m.startswith(module + ".")]
    layers = {layer_of(i.target) for i in ALL_IMPORTS if i.source in members}
    return layers - {layer_of(module), "foundation"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_header_names_the_layers_a_module_imports(module):
    declared = declared_dependencies(module)
    actual = actual_dependencies(module)
    expected = ", ".join(sorted(actual, key=LAYER_NAMES.index)) or "nothing in peftflow"
    assert declared is not None, f"{module}: end its docstring with 'Depends on: {expected}.'"
    assert declared == actual, f"{module}: its header should say 'Depends on: {expected}.'"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_500_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines; split it by what it does"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [sorted(c) for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
