"""The package's import arrows, read from the source with ``ast``, against the layering of the
design: data flows one way (server -> engine -> models -> ops + caches -> kv + abstracts;
engine -> pages), there are no import circles, ``caches`` imports no kernel, host bookkeeping or
anything above it, ``pages`` imports no JAX, and models and the engine never test a view's class.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import jaxkv

PACKAGE = pathlib.Path(jaxkv.__file__).parent

# What each part of the package may import from the rest of it (its own modules aside).
ALLOWED: dict[str, set[str]] = {
    "__init__": {"abstracts", "errors"},
    "__main__": {"cli"},
    "_sizes": set(),
    "_validation": set(),
    "_arguments": set(),
    "compilation": set(),
    "errors": set(),
    "abstracts": set(),
    "quantization": set(),
    "kv": {"abstracts", "quantization"},
    "caches": {"_sizes", "_validation", "abstracts", "errors", "kv", "quantization"},
    "sharding": {"_sizes", "_validation", "abstracts", "caches", "errors", "quantization"},
    "ops": {"_sizes", "_validation", "abstracts", "kv", "quantization"},
    "pages": {"_sizes"},
    "models": {"_sizes", "_validation", "abstracts", "caches", "errors", "kv", "ops", "sharding"},
    "io": {"_sizes", "_validation", "abstracts", "caches", "errors", "models"},
    "memory": {"_sizes", "caches", "models", "quantization", "sharding"},
    "engine": {
        "_sizes",
        "compilation",
        "_validation",
        "abstracts",
        "caches",
        "errors",
        "io",
        "kv",
        "models",
        "ops",
        "pages",
        "quantization",
        "sharding",
        "_arguments",
    },
    "serve": {"_arguments", "_validation", "engine", "errors", "io", "pages"},
    "bench": {"_arguments", "engine", "io"},
    "cli": {
        "__init__",
        "_arguments",
        "compilation",
        "_validation",
        "bench",
        "engine",
        "errors",
        "io",
        "memory",
        "serve",
    },
}

THIRD_PARTY_FORBIDDEN = {"pages": {"jax", "jaxlib"}}


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Every module's imports of other modules (jaxkv ones by module name, others by top-level
    package), wherever in the file they are (function-level imports count too)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        found = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{name}: use absolute imports, not relative ones")
        graph[name] = found
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()
GRAPH = _imports(MODULES)


def test_every_part_is_known():
    assert {_part(module) for module in MODULES} <= set(ALLOWED)


def test_each_part_imports_only_what_the_layering_allows():
    wrong = defaultdict(set)
    for module, imported in GRAPH.items():
        for target in imported:
            if not target.startswith("jaxkv"):
                top = target.split(".")[0]
                if top in THIRD_PARTY_FORBIDDEN.get(_part(module), set()):
                    wrong[module].add(target)
                continue
            if _part(target) != _part(module) and _part(target) not in ALLOWED[_part(module)]:
                wrong[module].add(target)
    assert not wrong, f"imports against the layering: {dict(wrong)}"


def test_caches_import_no_kernel_host_bookkeeping_or_model():
    for module, imported in GRAPH.items():
        if _part(module) == "caches":
            bad = {t for t in imported if _part(t) in {"ops", "pages", "models", "engine"}}
            assert not bad, f"{module} imports {bad}"


def test_no_import_circles():
    internal = {m: {t for t in ts if t in MODULES and t != m} for m, ts in GRAPH.items()}
    # A package's __init__ re-exports its modules; a module importing a sibling through the
    # package is an arrow to the sibling, never to the __init__ (see _imports), so the
    # __init__ -> module arrows cannot close a circle with real dependencies.
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in internal[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in internal:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_models_and_engine_never_test_a_views_class():
    views = set()
    for module, path in MODULES.items():
        if _part(module) == "caches":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("View"):
                    views.add(node.name)
    assert {"TransformerCacheView", "PagedCacheView", "MambaCacheView"} <= views
    offenders = []
    for module, path in MODULES.items():
        if _part(module) not in {"models", "engine"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                if any(name in ast.unparse(node.args[1]) for name in views):
                    offenders.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
