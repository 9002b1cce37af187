"""The import graph flows one way: no cycle, and no module imports a layer above its own.

Every ``import`` in ``funtrain/`` counts, including those inside functions (a lazy import
hides a cycle; it does not remove it). Importing ``funtrain.a.b`` also runs the package
``funtrain.a``, so that is an edge too. docs/design.md draws the same layers.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "funtrain"

# Lowest first; a module may import its own layer or a lower one. Prefixes match submodules.
LAYERS = [
    ("base", ["funtrain._typing", "funtrain._version", "funtrain._checks", "funtrain._tree",
              "funtrain._random"]),
    ("core", ["funtrain.losses", "funtrain.precision", "funtrain.parallel", "funtrain.interop",
              "funtrain.data", "funtrain.optim", "funtrain.profile"]),
    ("compression", ["funtrain.quant", "funtrain.sparsity"]),
    ("models", ["funtrain.nn", "funtrain.remat"]),
    ("training", ["funtrain.train"]),
    ("entry points", ["funtrain.cli", "funtrain.__main__", "funtrain"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str:  # the module a dotted name lives in
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".")[:len(mod.split(".")) - node.level + is_pkg]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != "funtrain":
                    continue
                target = owner(name)
                parts = target.split(".")
                # every package on the way to the target, except the module's own (Python
                # has them loaded already), then the target itself, even when it is one of
                # the module's own packages (`from funtrain.optim import adam` in
                # optim/transforms.py runs optim/__init__.py, which imports transforms)
                for k in range(1, len(parts)):
                    dep = ".".join(parts[:k])
                    if dep != mod and not mod.startswith(dep + "."):
                        targets.add(dep)
                if target != mod:
                    targets.add(target)
        graph[mod] = targets
    return graph


def _layer(mod: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the package root is one module, not a prefix of every module
            if mod == prefix or (prefix != "funtrain" and mod.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{mod} is in no layer of LAYERS; add it"
    return best[0]


def test_every_module_has_a_layer():
    for mod in _modules():
        _layer(mod)


def test_no_import_goes_up_a_layer():
    bad = [f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
           for mod, deps in _graph().items() for dep in sorted(deps)
           if _layer(dep) > _layer(mod)]
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> list[str] | None:
        if mod in path:
            return path[path.index(mod):] + [mod]
        if mod in done:
            return None
        for dep in sorted(graph[mod]):
            if cycle := visit(dep, path + [mod]):
                return cycle
        done.add(mod)
        return None

    return next((c for mod in sorted(graph) if (c := visit(mod, []))), None)


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_an_import_of_the_own_package():
    """`from funtrain.optim import adam` inside optim/transforms.py is a cycle through
    optim/__init__.py, and an unlisted module has no layer."""
    graph = _graph()
    graph["funtrain.optim.transforms"].add("funtrain.optim")
    assert _find_cycle(graph) is not None
    with pytest.raises(AssertionError, match="funtrain.newthing is in no layer"):
        _layer("funtrain.newthing")


def test_the_checker_sees_a_lazy_cycle():
    """The old back edge (nn.combinators importing remat inside a function) is a cycle."""
    graph = _graph()
    graph["funtrain.nn.combinators"].add("funtrain.remat")
    cycle = _find_cycle(graph)
    assert cycle is not None and "funtrain.remat" in cycle and cycle[0] == cycle[-1]
