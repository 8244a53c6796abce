"""The floor plan holds: no import cycle between any two files of the package (imports inside
functions and under TYPE_CHECKING included), and no C source hidden in a Python string."""

from __future__ import annotations

from pathlib import Path

import grimp


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def test_strongly_connected_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["d"]]


def test_no_import_cycle_between_files() -> None:
    graph = grimp.build_graph("mfac", exclude_type_checking_imports=False)
    modules = {m for m in graph.modules if m == "mfac" or m.startswith("mfac.")}
    edges = {
        m: {
            other
            for other in graph.find_modules_directly_imported_by(m)
            if other in modules
        }
        for m in modules
    }
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    assert cycles == [], f"import cycles between files: {cycles}"


def test_no_c_source_in_python_files() -> None:
    import mfac

    root = Path(mfac.__file__).parent
    hidden = [str(p.relative_to(root)) for p in root.rglob("*.py") if "#include" in p.read_text()]
    assert hidden == [], f"C source inside Python files: {hidden}"
