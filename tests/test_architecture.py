"""The package's import graph: no cycles between modules, and the toy world builds on the models, not the reverse.

Every import counts, also those inside functions (a lazy import is still a dependency). A submodule importing
its own parent package is not a cycle: Python imports the parent first in any case.
"""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "stereo"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the stereo modules it imports (`from a import b` counts a.b when b is a module)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in files and t != name and t not in ancestors}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The package in layers: a module imports its own group or a lower layer, never a higher layer nor another
# group of its own layer (README, "Architecture"). Foundations may import one another (cycles are checked above).
LAYERS = [
    {"stereo", "stereo.manifest", "stereo.config", "stereo.parallel", "stereo.models", "stereo.conditioning",
     "stereo.generation", "stereo.export", "stereo.modelcard", "stereo.publish"},
    {"stereo.attacks", "stereo.anchors"},  # attacks on a pipeline; anchor prompts
    {"stereo.erasure", "stereo.evaluation"},  # erasure machinery; the evaluation
    {"stereo.recipes"},  # ESD, STEREO: the algorithms, on the machinery
    {"stereo.toy"},  # the toy world: models, detector and features built here, plugged in from above
]


def group_of(module: str) -> tuple[int, str]:
    """(layer, group) of a module: its longest listed prefix."""
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for layer, groups in enumerate(LAYERS):
            if prefix in groups:
                return layer, prefix
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        layer, group = group_of(module)
        for target in sorted(targets):
            t_layer, t_group = group_of(target)
            if t_layer > layer or (t_layer == layer and t_group != group and layer > 0):
                found.append(f"{module} -> {target}")
    return found


def test_imports_go_down_the_layers_only():
    assert layering_violations(import_graph()) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import():
    graph = {"stereo.erasure.trainer": {"stereo.recipes.esd", "stereo.evaluation.runner", "stereo.models.tiny"},
             "stereo.recipes.esd": {"stereo.erasure.trainer"}, "stereo.models.tiny": set()}
    assert layering_violations(graph) == ["stereo.erasure.trainer -> stereo.evaluation.runner",
                                          "stereo.erasure.trainer -> stereo.recipes.esd"]


def test_models_do_not_import_the_toy_world():
    graph = import_graph()
    offenders = {m: sorted(t for t in graph[m] if t.startswith("stereo.toy")) for m in graph
                 if m.startswith("stereo.models")}
    assert not any(offenders.values()), offenders


def test_the_loader_finds_the_toy_weights_where_the_toy_world_keeps_them():
    from stereo.models.loading import _toy_pipeline_dir
    from stereo.toy import TOY_WEIGHTS_DIR

    assert _toy_pipeline_dir() == (TOY_WEIGHTS_DIR / "pipeline").resolve()
