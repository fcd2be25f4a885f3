"""The package's architecture, checked from its source: every module imports only from its own layer or the
layers below it, no import circle exists (counting imports inside functions too), no module reaches into
another module's ``_private`` names, and no module grows past 600 lines. A newcomer can trust the folder tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "adn"

# Bottom to top. A package may import from itself and from the packages listed before it; packages in
# one tuple are siblings that must not import each other (detection and language models share nothing).
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("utils",),
    ("core",),
    ("models",),
    ("convert",),
    ("runtime",),
    ("training",),
    ("vision",),
    ("detection", "lm"),
    ("deploy",),
    ("serve",),
    ("studies",),
    ("cli",),
]
RANK = {package: rank for rank, group in enumerate(LAYERS) for package in group}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every import in the file, at any depth."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # `from adn.x import y` may name a submodule y
            found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
    return found


def _package(module: str) -> str | None:
    """The first-level package of an adn module (``adn.core.skip`` -> ``core``), None outside adn."""
    parts = module.split(".")
    if parts[0] != "adn":
        return None
    return parts[1] if len(parts) > 1 else "adn"


MODULES = {_module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}
LAYERED = {name: path for name, path in MODULES.items() if _package(name) in RANK}


def test_every_module_of_the_package_is_in_a_layer():
    # Top-level modules are the public facade (adn/__init__.py, __main__) and the deprecated aliases of
    # moved modules; everything else lives in a layered package.
    loose = [
        name
        for name, path in MODULES.items()
        if _package(name) not in RANK
        and name not in ("adn", "adn.__main__")
        and "utils.deprecated import" not in path.read_text()
    ]
    assert not loose, f"modules outside every layer (add them to a package or to LAYERS): {loose}"


def test_modules_import_only_from_their_layer_or_below():
    wrong = []
    for name, path in LAYERED.items():
        own = _package(name)
        for target, _, line in _imports(path):
            other = _package(target)
            if other is None or other == own:
                continue
            if other not in RANK:
                wrong.append(
                    f"{path.relative_to(SOURCE.parent)}:{line} imports {target}, outside the layers "
                    f"(a deprecated alias or the package facade)"
                )
            elif RANK[other] >= RANK[own]:
                wrong.append(
                    f"{path.relative_to(SOURCE.parent)}:{line}: {own} imports {target} "
                    f"({other} is {'beside' if RANK[other] == RANK[own] else 'above'} it)"
                )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _resolve(target: str, names: list[str]) -> list[str]:
    """The adn modules an import statement loads (a package's __init__ included)."""
    loaded = [target] if target in MODULES else []
    loaded += [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
    return loaded


def test_no_import_circles_even_inside_functions():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, _ in _imports(path):
            for other in _resolve(target, names):
                # A package importing its own submodules (a facade) is not a circle.
                if other != name and not other.startswith(name + "."):
                    graph[name].add(other)
    # Depth-first search for a back edge; report the first circle found.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(LAYERED):
        if node not in state and (circle := visit(node)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_no_private_names_are_imported_across_modules():
    reached = [
        f"{path.relative_to(SOURCE.parent)}:{line} takes {name} from {target}"
        for path in MODULES.values()
        for target, names, line in _imports(path)
        if _package(target) is not None
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not reached, "private names used from another module:\n" + "\n".join(reached)


def test_no_module_is_over_600_lines():
    long = {
        str(path.relative_to(SOURCE.parent)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
