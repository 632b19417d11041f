"""kvmlet's packages form layers, and imports only point down (docs/design.md, "Layout").

Every `import` in kvmlet counts, at module level or inside a function (lazy imports are
still dependencies); only imports under `if TYPE_CHECKING:` are left out, since they never
run. A package may import its own modules and any package of a lower layer, nothing else.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kvmlet"

LAYERS = {
    "errors": 0,
    "kvm": 1,
    "memory": 1,
    "bus": 2,
    "boot": 3,
    "devices": 3,
    "guest": 3,
    "host": 3,
    "ninep": 3,
    "snapshot": 3,
    "virtio": 4,
    "vhost": 5,
    "vstate": 5,
    "machine": 6,
    "api": 7,
    "sandboxing": 7,
    "cli": 8,
    "__main__": 9,
}
"""Layer of each top-level module or package of kvmlet (the package's own __init__, which
only re-exports names lazily, stands above them all)."""


def _top_level(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kvmlet":
        return None
    return parts[1] if len(parts) > 1 else ""


def _runtime_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import outside `if TYPE_CHECKING:` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kvmlet":  # the version is the root's own; names are lazy
                names = [alias.name for alias in node.names if alias.name != "__version__"]
                found.extend((node.lineno, f"kvmlet.{name}") for name in names)
            else:
                found.append((node.lineno, node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def upward_imports() -> list[str]:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative == Path("__init__.py"):
            continue
        own = relative.parts[0].removesuffix(".py")
        for line, module in _runtime_imports(ast.parse(path.read_text(), str(path))):
            target = _top_level(module)
            if target is None or target == own:
                continue
            if target not in LAYERS or LAYERS[target] >= LAYERS[own]:
                violations.append(f"kvmlet/{relative}:{line} ({own}) imports {module}")
    return violations


def test_every_package_has_a_layer():
    packages = {path.name.removesuffix(".py") for path in PACKAGE.iterdir()}
    packages -= {"__init__", "__pycache__"}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_imports_point_down_the_layers():
    assert upward_imports() == []


def test_the_check_sees_lazy_imports_and_ignores_type_checking_blocks():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from kvmlet.machine import machine\n"
        "def late():\n"
        "    import kvmlet.cli\n"
    )
    assert [module for _, module in _runtime_imports(ast.parse(source))] == [
        "typing",
        "kvmlet.cli",
    ]
