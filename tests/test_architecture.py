"""The layers' imports point down only (docs/architecture.md): peft_core <- pipelines <- studio <- ui.

Checked on the source, so an import inside a function counts as much as one at the top (only
`if TYPE_CHECKING:` imports, type hints that never run, are left out). Also: no import cycle
between any two modules, and no module imports another module's private (`_name`) names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("peft_core", "pipelines", "studio", "ui")  # each may import the ones before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import that runs, wherever it stands."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from package import submodule` names the submodule)."""
    modules = project_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in runtime_imports(path):
            if target.split(".")[0] not in LAYERS:
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges[name].update(submodules or [target])
    return edges


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_imports_point_down_only():
    upward = []
    for name, path in project_modules().items():
        for target, _, line in runtime_imports(path):
            if target.split(".")[0] in LAYERS and layer(target) > layer(name):
                upward.append(f"{name} (line {line}) imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target == node or target not in edges:
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := walk(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node, [node])):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, path in project_modules().items():
        for target, names, line in runtime_imports(path):
            if target.split(".")[0] not in LAYERS:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{name} (line {line}) imports {', '.join(private)} from {target}")
    assert not offenders, "\n".join(offenders)


def test_the_checks_catch_what_they_are_for():
    """The cycle finder and the layer order on small made-up graphs (a check that cannot fail is no check)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer("ui.app") > layer("studio.cli") > layer("pipelines.train") > layer("peft_core.model")
