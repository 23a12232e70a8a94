"""peft_core's own import rules, on top of tests/test_architecture.py (layers point down, no cycle,
no private names imported): method modules sit below attach/load/export, no module reaches into
another's private helpers through a module object, and peft_core needs torch, not the HF stack.
Checked on the source: function-level imports count, `if TYPE_CHECKING:` ones (type hints) do not."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_core

ROOT = Path(peft_core.__file__).parent
# Method modules hold a method's math and plumbing; attach/load/export sit above them.
ABOVE_METHODS = ("peft_core.model", "peft_core.export")
# Where torch alone must do: peft_core never imports these (DESIGN.md).
FORBIDDEN = ("transformers", "diffusers", "gradio", "peft", "studio", "pipelines", "ui")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every runtime import statement in the file."""
    found: list[tuple[str, list[str]]] = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_method_modules_do_not_import_attach_load_or_export():
    modules = {module_name(path) for path in ROOT.rglob("*.py")}
    for path in sorted((ROOT / "methods").glob("*.py")):
        for target, names in imports(path):
            assert not target.startswith(ABOVE_METHODS), f"{path.name} imports {target}"
            if target == "peft_core" and path.name != "__init__.py":
                # Only submodules below the methods (`from peft_core import layer`), never the package's own
                # names (attach, load) nor the package itself (`import peft_core`).
                submodules = [f"peft_core.{name}" for name in names]
                below = all(m in modules and not m.startswith(ABOVE_METHODS) for m in submodules)
                assert submodules and below, f"{path.name} imports the peft_core package ({', '.join(names)})"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_a_private_name_of_another_through_a_module_object():
    modules = {module_name(path) for path in ROOT.rglob("*.py")}
    for path in sorted(ROOT.rglob("*.py")):
        # `from peft_core import export as export_module` then `export_module._helper`: importing it in all but name.
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft_core"):
                aliases.update(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                value = node.value
                dotted = []
                while isinstance(value, ast.Attribute):
                    dotted.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases | {"peft_core"}:
                    raise AssertionError(f"{module_name(path)} uses {value.id}.{node.attr} (line {node.lineno})")


def test_peft_core_needs_torch_only():
    for path in sorted(ROOT.rglob("*.py")):
        for target, _ in imports(path):
            assert target.split(".")[0] not in FORBIDDEN, f"{module_name(path)} imports {target}"
