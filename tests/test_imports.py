"""The package's import structure: no private names across modules, no cycles, CLI code only in catfeat/cli/.

Read from the source with ``ast`` (function-level imports, ``importlib.import_module("catfeat...")`` calls,
"catfeat.module:name" strings resolved at run time (the registry's builders) and module ``__getattr__``
included), so nothing is imported.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "catfeat"

# Groups of modules that still import each other in a circle, each for a reason; a cycle outside
# them fails test_no_other_import_cycles.
KNOWN_CYCLES: list[set[str]] = []  # none left: a new cycle fails below


# "catfeat.models.lite:EfficientNetLite0": a module and a name the code imports when it runs
_REF = re.compile(r"(catfeat(?:\.\w+)+):\w+")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(module imported, name imported or "", line) for every catfeat import in ``path``, at any depth."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "catfeat":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists():
                    out.append((sub, "", node.lineno))  # a submodule: `from . import streaming`
                else:
                    out.append((base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "catfeat"]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and node.args[0].value.split(".")[0] == "catfeat":
            out.append((node.args[0].value, "", node.lineno))  # importlib.import_module("catfeat.x")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _REF.fullmatch(node.value):
            out.append((_REF.fullmatch(node.value).group(1), "", node.lineno))  # "catfeat.x:builder"
    return out


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = {m for m, _, _ in _imports(path) if m != "catfeat"}
        if path == PACKAGE / "__init__.py":  # the public API's lazy table: name -> defining module
            graph["catfeat"] |= {m for m in _exports_table(path).values()}
    return graph


def _exports_table(path: Path) -> dict[str, str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    reach = {m: _reachable(graph, m) for m in graph}
    found = []
    for module in sorted(graph):
        circle = {m for m in reach[module] if module in reach[m]}
        if circle and circle not in found:
            found.append(circle)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for module, name, line in _imports(path):
            if name.startswith("_") and not name.startswith("__") and module != _module_name(path):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} from {module}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_import_scan_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "catfeat.outliers" in graph["catfeat.head.report"]  # `from catfeat.outliers import` inside a function
    assert "catfeat.cache.rows" in graph["catfeat.head.streamed"]  # `from catfeat.cache import rows`
    assert "catfeat.cache.store" in graph["catfeat.extraction.ray_engine"]  # `from ..store import ...`
    assert "catfeat.models.lite" in graph["catfeat.models.registry"]  # the builders' "module:function" strings


def test_the_builders_do_not_import_the_registry():
    # the registry names its builders by "module:function" strings; they read the weights vocabulary
    # from catfeat.models.weights, never the registry back
    graph = _graph()
    assert "catfeat.models.registry" not in _reachable(graph, "catfeat.models.lite")
    assert "catfeat.models.weights" in graph["catfeat.models.lite"]


def test_head_evaluation_and_comparison_have_no_import_cycle():
    graph = _graph()
    layers = ["catfeat.cache.store", "catfeat.cache.rows", "catfeat.head.scoring", "catfeat.head.estimator",
              "catfeat.head.comparison", "catfeat.head.report"]
    # each reaches none of the layers after it: comparison uses the estimator and scoring, the
    # estimator uses scoring (row helpers), scoring (which tunes heads) and the data layer use neither
    for i, module in enumerate(layers):
        above = set(layers[i + 1:]) & _reachable(graph, module)
        assert not above, f"{module} imports (directly or not) {sorted(above)}"
    for module in ("catfeat.head.scoring", "catfeat.head.comparison"):
        assert module not in _reachable(graph, module)


def test_streamed_head_reaches_the_model_helpers_not_the_head():
    # FusedHead.fit/predict_proba hand streamed rows to the Keras adapters of head.streamed; both
    # use head.network's helpers, and head.streamed never imports the estimator back
    graph = _graph()
    assert "catfeat.head.network" in graph["catfeat.head.streamed"]
    assert "catfeat.head.estimator" not in _reachable(graph, "catfeat.head.streamed")
    assert not {"catfeat.head.estimator", "catfeat.head.streamed"} & _reachable(graph, "catfeat.head.network")


def test_no_import_cycles():
    graph = {m: deps for m, deps in _graph().items() if m != "catfeat"}  # __init__ only loads names lazily
    assert not KNOWN_CYCLES
    assert _cycles(graph) == [], f"import cycles: {_cycles(graph)}"


def test_no_module_getattr_outside_the_package_init():
    # re-export shims (a module-level __getattr__) hide imports and circles; only catfeat/__init__.py
    # has one, for its lazy public API
    found = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
             if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert found == ["catfeat/__init__.py"]


def test_every_public_name_of_the_package_resolves_to_where_it_is_defined():
    table = _exports_table(PACKAGE / "__init__.py")
    for name, module in table.items():
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
            {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assert name in defined, f"catfeat.{name}: {module} does not define it"


def test_only_the_cli_parses_arguments_and_prints():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[1] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == "argparse":
                bad.append(f"{rel}:{node.lineno}: imports argparse")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{rel}:{node.lineno}: calls print(")
    assert not bad, "CLI code outside catfeat/cli/:\n" + "\n".join(bad)
