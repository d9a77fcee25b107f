"""The folders of ``zerocon_core/`` and ``nodes/`` import only downward, and no two modules import each other.

Layers, lowest first: ``zerocon_core/{common, method, text, diffuseit, evaluation, diffusers_host, toyworld}``, then
``nodes/{glue, families, classes}``. Every import statement counts, those inside functions and under
``TYPE_CHECKING`` included (a type-only import is still a circle for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    "zerocon_core/common",
    "zerocon_core/method",
    "zerocon_core/text",
    "zerocon_core/diffuseit",
    "zerocon_core/evaluation",
    "zerocon_core/diffusers_host",
    "zerocon_core/toyworld",
    "nodes/glue",
    "nodes/families",
    "nodes/classes",
]
TOP = {"zerocon_core/__init__.py", "zerocon_core/__main__.py", "nodes/__init__.py"}


def _layer(path: Path) -> int | None:
    rel = path.relative_to(ROOT).as_posix()
    return next((i for i, layer in enumerate(LAYERS) if rel.startswith(layer + "/")), None)


def _targets(path: Path, node: ast.ImportFrom) -> set[Path]:
    base = path.parent.parents[node.level - 2] if node.level > 1 else path.parent
    target = base.joinpath(*node.module.split(".")) if node.module else base
    found = {p for p in (target.with_suffix(".py"), target / "__init__.py") if p.is_file()}
    found |= {target / f"{a.name}.py" for a in node.names if (target / f"{a.name}.py").is_file()}
    return found


def import_graph() -> dict[Path, set[Path]]:
    """Each pack module -> the pack modules its relative imports reach."""
    files = [p for d in ("zerocon_core", "nodes") for p in (ROOT / d).rglob("*.py")]
    graph = {}
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
        graph[path] = set().union(*(_targets(path, n) for n in nodes)) - {path} if nodes else set()
    return graph


def test_every_module_is_in_a_layer():
    loose = [p.relative_to(ROOT).as_posix() for p in import_graph() if _layer(p) is None]
    assert set(loose) <= TOP, f"modules outside the layer folders: {sorted(set(loose) - TOP)}"


def test_imports_go_only_downward():
    upward = []
    for path, targets in import_graph().items():
        for target in targets:
            if _layer(path) is not None and _layer(target) is not None and _layer(target) > _layer(path):
                upward.append(f"{path.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    assert not upward, "imports up the layers:\n" + "\n".join(sorted(upward))


def _cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    state: dict[Path, int] = {}
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.name == "__init__.py" and nxt.parent in node.parents:
                continue  # a package's own __init__ runs first; not a circle of modules
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_two_modules_import_each_other():
    cycle = _cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(p.relative_to(ROOT).as_posix() for p in cycle)


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """The graph would show a circle the way a regression would add one (sampler <-> inversion)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    assert _cycle({a: {b}, b: {a}}) == [a, b, a]
    assert _cycle({a: {b}, b: set()}) is None
