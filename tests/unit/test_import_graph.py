"""hope_dist's modules import one way: every module imports, the graph of their imports of each other
has no cycle, and none imports a layer built on hope_dist (data_prep, tools, bench). The graph is read
from the source with ast, counting every import statement (also inside functions and `if TYPE_CHECKING:`),
so a circle hidden behind a lazy import shows too. Before issue 27 one circle joined 21 modules
(checkpoint_manager -> trainer, config -> parallel/deepspeed_engine)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import hope_dist

PACKAGE = Path(hope_dist.__file__).parent


def modules() -> dict[str, Path]:
    """Dotted name -> source file of every module and package of hope_dist."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the hope_dist modules it imports (`from a.b import c` is a.b.c when that is a module)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, file in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {r for t in targets if t.startswith("hope_dist.") and (r := resolve(t)) not in (None, name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, todo = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph[nxt])))
    return None


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["c"] = {"d"}
    assert find_cycle(graph) is None


def test_no_import_cycle():
    mods = modules()
    graph = import_graph(mods)
    assert len(graph) > 60 and graph["hope_dist.trainer"] >= {"hope_dist.config", "hope_dist.parallel.engine"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_of_a_layer_above():
    """data_prep, tools and bench are built on hope_dist (issue 27 item 4): it imports none of them."""
    above = ("data_prep", "tools", "bench")
    found = []
    for name, file in modules().items():
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{name} imports {t}" for t in targets if t.split(".")[0] in above]
    assert found == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name):
    """Optional extras (lm-eval, DeepSpeed) may be absent; their modules are then skipped, not failed."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] == "hope_dist":
            raise
        pytest.skip(f"{name} needs {e.name}")
