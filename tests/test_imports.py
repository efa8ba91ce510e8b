"""The package's import structure: light component packages, no import cycle, no import hidden in a function."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "eblvm"
# What the component packages (the models, posteriors and objectives a user builds on) must not pull in: the
# training stack, metrics, plotting and configuration.
HEAVY = ("pytorch_lightning", "lightning_fabric", "lightning", "torchmetrics", "sklearn", "matplotlib", "hydra")


def loaded_after(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """The packages of ``heavy`` that a fresh interpreter has loaded after running ``imports``."""
    code = (
        "import json, sys\n"
        f"{imports}\n"
        f"heavy = {heavy!r}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "print(json.dumps({'eblvm': sys.modules['eblvm'].__file__, 'loaded': loaded}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["eblvm"]).resolve() == (PACKAGE / "__init__.py").resolve()
    return report["loaded"]


def test_component_packages_import_without_the_training_stack():
    loaded = loaded_after("import eblvm.models, eblvm.posteriors, eblvm.objectives", HEAVY)
    assert loaded == [], f"importing the component packages loaded {loaded}"


def test_starting_a_run_does_not_import_scikit_learn():
    """scikit-learn (the linear probe, the scikit-learn toy datasets) loads when used, not when train.py starts
    (Lightning itself loads torchmetrics and matplotlib)."""
    assert loaded_after("import eblvm.run", ("sklearn",)) == []


# --- the import graph ------------------------------------------------------------------------------------------


def package_modules() -> dict[str, Path]:
    """Every module of eblvm by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> set[str]:
    """The eblvm modules an import statement of ``module`` loads: ``import eblvm.x`` → eblvm.x; ``from eblvm.x
    import y`` → eblvm.x, and eblvm.x.y when that is a module (relative imports resolved)."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        names = {source} | {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules}
    return {name for name in names if name == "eblvm" or name.startswith("eblvm.")}


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """The module-level import edges between eblvm's modules, and the imports of eblvm modules found inside a
    function or method (as ``module:line``). Imports under ``if TYPE_CHECKING:`` do not run and make no edge."""
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    in_functions: list[str] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, type_checking: bool, name=name, is_package=is_package) -> None:
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = imported_modules(node, name, is_package, modules)
                if targets and in_function:
                    in_functions.append(f"{name}:{node.lineno} imports {', '.join(sorted(targets))}")
                elif not type_checking:
                    graph[name].update(target for target in targets if target != name)
                return
            inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            guarded = type_checking or _is_type_checking_block(node)
            for child in ast.iter_child_nodes(node):
                visit(child, inside, guarded)

        visit(ast.parse(path.read_text(), filename=str(path)), False, False)
    return graph, in_functions


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (edges to names that are not
    modules of the graph are ignored)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if successor not in graph:
                continue
            if state.get(successor) == 1:
                return [*path[path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_graph_helpers_see_cycles_and_edges():
    """The checks below are only as good as these helpers: a cycle is found, a DAG passes, edges resolve."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph, _ = import_graph()
    assert "eblvm.assemble" in graph and "eblvm.bilevel.module" in graph["eblvm.assemble"]
    assert "eblvm.errors" in graph["eblvm.checkpoints"]
    assert len(graph) == len(package_modules()) > 20


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_eblvm_module_is_imported_inside_a_function():
    _, in_functions = import_graph()
    assert in_functions == [], "function-level imports of eblvm modules:\n" + "\n".join(in_functions)
