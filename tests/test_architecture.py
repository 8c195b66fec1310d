"""The package's structure, as ARCHITECTURE.md states it: layers imported one way, no import circle,
no private name across modules, no in-function import of the package, functions a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanomarkov"
MAX_FUNCTION_LINES = 60
# Lower layers never import higher ones (ARCHITECTURE.md); a module may import its own layer and below.
LAYERS = [
    {"errors", "files", "memory", "progress"},
    {"processes"},
    {"model", "gpt_config", "data", "batches", "checkpoint", "config", "distributed"},
    {"train", "evaluate", "report", "interp", "dynamics", "tune"},
    {"sweep"},
    {"reproduce"},
    {"cli", "__main__"},
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}
# Modules outside the layers' names: the package's front door imports what it re-exports.
FRONT = {"__init__"}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(module_name):
    """The first component below nanomarkov: nanomarkov.processes.hmm -> processes."""
    parts = module_name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_imports(tree, module_name):
    """(node, imported module, imported names, the outermost function it is in or None) for each import of the
    package."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            inner = in_function or (child.name if is_function else None)
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    package = module_name.split(".")[: len(module_name.split(".")) - child.level + 1]
                    if not module_name.endswith("__init__"):
                        package = module_name.split(".")[: -child.level]
                    base = ".".join(package + ([base] if base else []))
                if base == "nanomarkov" or base.startswith("nanomarkov."):
                    found.append((child, base, [a.name for a in child.names], in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("nanomarkov"):
                        found.append((child, alias.name, [], in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def parsed():
    return [(path, dotted(path), ast.parse(path.read_text())) for path in modules()]


def test_no_function_is_longer_than_a_reader_can_hold():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, _, tree in parsed()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over ~60 lines:\n" + "\n".join(long)


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{name}: {node.lineno} imports {imported}.{alias}"
        for _, name, tree in parsed()
        for node, imported, aliases, _ in package_imports(tree, name)
        for alias in aliases
        if alias.startswith("_") and imported != name
    ]
    assert not private, "\n".join(private)


def imported_when_used(module_name, function_name):
    """The two imports of the package a function may make: the command line's verb (`cmd_train`...) imports its
    modules when it runs, and the front door's `__getattr__` imports `load` when it is first used, so that
    --help, generate and theory never load torch (ARCHITECTURE.md)."""
    return (module_name == "nanomarkov.cli" and function_name.startswith("cmd_")) or (
        module_name == "nanomarkov" and function_name == "__getattr__"
    )


def test_the_package_is_imported_at_the_top_of_a_module_only():
    inside = [
        f"{name}: line {node.lineno} imports {imported} inside a function"
        for _, name, tree in parsed()
        for node, imported, _, in_function in package_imports(tree, name)
        if in_function and not imported_when_used(name, in_function)
    ]
    assert not inside, "\n".join(inside)


def test_imports_go_down_the_layers_only():
    upward = []
    for _, name, tree in parsed():
        here = top(name)
        if here in FRONT:
            continue
        assert here in LAYER_OF, f"{name} is in no layer of ARCHITECTURE.md; add it to LAYERS here and there"
        for node, imported, aliases, _ in package_imports(tree, name):
            targets = [imported] if imported != "nanomarkov" else [f"nanomarkov.{a}" for a in aliases]
            for target in targets:
                there = top(target)
                if there in FRONT or there not in LAYER_OF:
                    upward.append(f"{name}: line {node.lineno} imports {target} (import nanomarkov.errors instead)")
                elif LAYER_OF[there] > LAYER_OF[here]:
                    upward.append(f"{name}: line {node.lineno} imports {target}, a higher layer")
    assert not upward, "\n".join(upward)


def test_model_knows_no_process_and_processes_know_only_errors_files_and_memory():
    for _, name, tree in parsed():
        imported = {top(target) for _, target, _, _ in package_imports(tree, name)}
        if name in ("nanomarkov.model", "nanomarkov.gpt_config"):
            assert imported <= {"errors", "gpt_config"}, imported
        if top(name) == "processes":
            assert imported <= {"errors", "files", "memory", "processes"}, (name, imported)


def test_there_is_no_import_circle():
    graph = {}
    for _, name, tree in parsed():
        graph[name] = set()
        for _, target, aliases, _ in package_imports(tree, name):
            graph[name].add(target)
            graph[name].update(f"{target}.{a}" for a in aliases)  # `from pkg import module`
    graph = {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}
    # A package's __init__ that re-exports its own modules is the one allowed edge back.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
