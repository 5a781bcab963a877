"""The package's shape: imports run downwards (no cycle, no library module imports a
command-line entry point), modules under 500 lines, functions under 80.

Read from the source with `ast` (function-level imports count too); nothing is imported.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tusk_jax"
# Modules run as `python -m tusk_jax.<name>`: they may import the library and
# each other, the library never imports them.
ENTRY_POINTS = {
    "tusk_jax.main",
    "tusk_jax.evaluate",
    "tusk_jax.detect",
    "tusk_jax.learning_curve",
    "tusk_jax.export",
    "tusk_jax.convert_vgg16",
    "tusk_jax.datasets.prepare",
    "tusk_jax.tools.montage",
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module -> the tusk_jax modules it imports (a package where no submodule is named)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t if t in files else node.module for t in targets]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found[found.index(found[-1]) :]
    return None


def test_imports_have_no_cycle():
    graph = import_graph()
    assert "tusk_jax.train" in graph and "tusk_jax.state" in graph["tusk_jax.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_import_no_entry_point():
    upward = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name not in ENTRY_POINTS
        for target in sorted(targets & ENTRY_POINTS)
    ]
    assert not upward, upward


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_and_functions_are_small():
    too_long = []
    for name, path in module_files().items():
        text = path.read_text()
        if len(text.splitlines()) >= MAX_MODULE_LINES:
            too_long.append(f"module {name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
