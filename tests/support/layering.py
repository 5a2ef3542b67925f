"""The import graph of ``pipeline/``, read with ``ast`` (function-level imports included).

``python tests/support/layering.py [path/to/pipeline]`` prints the figures the layout is judged by: modules at the
top level of the package, import cycles between modules, and the longest functions.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "pipeline"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "pipeline.encode.encoder"
    path: Path
    imports: frozenset[str]  # every module named by an import anywhere in the file (dotted, absolute)


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Absolute dotted names of everything imported in ``tree``: ``import a.b`` gives ``a.b``,
    ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule or a name in ``a``)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for type checkers, never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def string_imports(tree: ast.AST) -> set[str]:
    """Modules a file imports by name at run time: the values of a dict literal assigned to
    ``_EXPORTS`` or ``STORES`` (``"pipeline.x"`` or ``"pipeline.x:Name"``), as the lazy public face
    and the store registry do."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if names & {"_EXPORTS", "STORES"}:
                found.update(v.value.split(":")[0] for v in node.value.values if isinstance(v, ast.Constant))
    return found


def exported_from(tree: ast.AST) -> dict[str, str]:
    """``_EXPORTS`` of a lazy face: name -> module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)}
    return {}


def private_attribute_uses(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """``module._name`` where ``module`` is a pipeline module bound by an import in this file."""
    aliases: dict[str, str] = {}
    package = name if is_package else name.rpartition(".")[0]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("pipeline"):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return {
        f"{aliases[n.value.id]}.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id in aliases
        and n.attr.startswith("_")
        and not n.attr.startswith("__")
    }


def calls_ray_init(tree: ast.AST) -> bool:
    """``ray.init(...)``, or ``init`` imported from ray."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "ray":
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "ray" and any(a.name == "init" for a in node.names):
            return True
    return False


def read_modules(root: Path = PACKAGE_ROOT) -> dict[str, Module]:
    """Every module's imports: statements anywhere in the file (function level included), the
    modules named by string in lazy faces and registries, and ``from pipeline import name`` read
    through the public face's ``_EXPORTS`` as an import of the module that defines ``name``."""
    trees = {module_name(p, root): (p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(root.rglob("*.py"))}
    face = exported_from(trees[root.name][1]) if root.name in trees else {}
    modules = {}
    for name, (path, tree) in trees.items():
        found = imported_names(tree, name, path.name == "__init__.py") | string_imports(tree)
        found |= {
            face[i.rsplit(".", 1)[1]]
            for i in found
            if i.rpartition(".")[0] == root.name and i.rsplit(".", 1)[1] in face
        }
        modules[name] = Module(name, path, frozenset(found))
    return modules


def internal_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    return {name: {i for i in m.imports if i in modules and i != name} for name, m in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def function_lengths(root: Path = PACKAGE_ROOT) -> list[tuple[int, str]]:
    """(lines, "module:function") for every function and method, longest first."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{module_name(path, root)}:{node.name}"))
    return sorted(out, reverse=True)


def main(argv: list[str]) -> int:
    """Figures for the package at ``argv[0]`` (default: this checkout's ``pipeline/``)."""
    root = Path(argv[0]).resolve() if argv else PACKAGE_ROOT
    modules = read_modules(root)
    top = [n for n, m in modules.items() if n.count(".") == 1 and m.path.name != "__init__.py"]
    found = cycles(internal_edges(modules))
    print(f"modules: {len(modules)} in all, {len(top)} at the top level of pipeline/")
    print(f"import cycles between modules: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print("longest functions: " + ", ".join(f"{name} ({n} lines)" for n, name in function_lengths(root)[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
