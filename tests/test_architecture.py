"""The shape of the package, read from its source: no import cycles among its modules, and no module
reaching into another's private (`_name`) names."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> its folder (pyproject's package-dir: the app ships as balora_diffusion.app)
ROOTS = {"balora_diffusion": REPO / "balora_diffusion", "balora_diffusion.app": REPO / "app"}

# Private names that modules still take from others, as (importing module, imported module, name);
# each goes once the owner makes the name public or the importer stops needing it. The test fails
# on any use not listed here, and on a listed one that is gone.
KNOWN_PRIVATE_USES: set[tuple[str, str, str]] = set()


def package_modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = package_modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[tuple[ast.alias, str, str | None]]:
    """(alias, imported module of the package, name taken from it or None) of one import statement."""
    found = []
    for alias in node.names:
        if isinstance(node, ast.Import):
            found.append((alias, alias.name, None))
            continue
        source = _absolute(module, node)
        submodule = f"{source}.{alias.name}"
        found.append((alias, submodule, None) if submodule in MODULES else (alias, source, alias.name))
    return [(alias, m, name) for alias, m, name in found if m in MODULES]


def _top_level_imports(tree: ast.Module):
    """The import statements a module runs when it is imported: its body's, with those under `if`,
    `try` and `with` at the top level, never those inside functions or classes or under TYPE_CHECKING."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending[:0] = node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody
        elif isinstance(node, ast.With):
            pending[:0] = node.body


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {target for node in _top_level_imports(tree) for _, target, _ in _targets(module, node)}
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses() -> set[tuple[str, str, str]]:
    """(module, other module, private name) for every `from other import _name` anywhere in a module
    and every `alias._name` on a name bound to another module of the package."""
    uses = set()
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}  # local name -> module of the package it is bound to
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias, target, name in _targets(module, node):
                    if name is None:
                        # `import a.b.c` binds `a`, reached through attributes; only aliases are tracked
                        if isinstance(node, ast.ImportFrom) or alias.asname:
                            bound[alias.asname or alias.name] = target
                    elif _private(name) and target != module:
                        uses.add((module, target, name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                target = bound.get(node.value.id)
                if target is not None and target != module:
                    uses.add((module, target, node.attr))
    return uses


def test_the_scan_sees_the_package_and_its_imports():
    graph = import_graph()
    assert "balora_diffusion.train.loop" in graph and "balora_diffusion.app.app" in graph
    assert "balora_diffusion.train.objective" in graph["balora_diffusion.train.loop"]
    assert "balora_diffusion.run_layout" in graph["balora_diffusion.runfolder"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_the_package_modules():
    assert cycles(import_graph()) == []


def test_no_module_takes_another_module_s_private_names():
    uses = private_uses()
    assert uses - KNOWN_PRIVATE_USES == set(), "private names used from other modules"
    assert KNOWN_PRIVATE_USES - uses == set(), "listed private uses that are gone: drop them from the list"
