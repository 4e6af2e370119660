"""The import contract: unipool's modules form ordered layers, each importing only from its own layer or
below, with no cycles. Function-local imports count: a deferred import is still a dependency."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unipool"

# Lowest first. The model core knows nothing of files, runs or training; weights and the run configuration
# sit below `Run`; `train` is a leaf that only the command line imports.
LAYERS = [
    ["unipool.errors"],
    ["unipool.model"],
    ["unipool.presets"],
    ["unipool.data"],
    ["unipool.config", "unipool.weights"],
    ["unipool.run"],
    ["unipool.interop"],
    ["unipool.analysis"],
    ["unipool.train"],
    ["unipool.cli", "unipool"],
]
ENTRY_POINTS = {"unipool.train.__main__"}  # `python -m unipool.train` calls the command line


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """module -> the unipool modules it imports anywhere in its body (`from a import b` counts as a.b when
    b is a module)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("unipool"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if is_module(full) else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("unipool")}
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (`unipool` itself is the package's __init__)."""
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def test_every_import_points_down_or_sideways():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in imports().items() if m not in ENTRY_POINTS
              for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {m: d for m, d in imports().items() if m not in ENTRY_POINTS}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d != "unipool":  # every module's package __init__ runs first; that is not a cycle
                visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_only_the_command_line_imports_training():
    outside = [f"{m} imports {d}" for m, deps in imports().items()
               if not m.startswith("unipool.train") and m != "unipool.cli" for d in deps
               if d == "unipool.train" or d.startswith("unipool.train.")]
    assert not outside, "\n".join(outside)


def test_the_contract_sees_deferred_imports(tmp_path):
    # the checker itself: a function-local import is found
    tree = ast.parse("def f():\n    from unipool.train import loop\n")
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].module == "unipool.train"
