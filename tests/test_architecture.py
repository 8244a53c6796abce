"""The floor plan. The package's layers: operators at the bottom; optim, prune, recovery and
curvature on them and independent of each other; the experiments on those; the command line on
top. Checked twice: by import-linter with the contracts in pyproject.toml, and by a walk over
every import statement of src/mfac (so that the check runs even without import-linter). No
import cycle between any two files (imports inside functions and under TYPE_CHECKING
included), and no C source hidden in a Python string."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mfac"
#: Rank of each sub-package: a module may import only from lower ranks (or its own package).
RANK = {
    "_config": 0, "_result": 0, "_validation": 0, "_paths": 0,
    "operators": 1, "optim": 2, "prune": 2, "recovery": 2, "curvature": 2,
    "experiments": 3, "cli": 4, "__main__": 5,  # python -m mfac: the command, above the cli
}  # fmt: skip


def _imports(path: Path) -> list[str]:
    """Absolute names of the mfac modules ``path`` imports (relative imports resolved)."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "mfac"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "mfac":
                out += [name] if node.module else [f"{name}.{a.name}" for a in node.names]
    return out


def test_every_import_goes_down_a_layer() -> None:
    bad = []
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if len(parts) == 1 and parts[0] == "__init__":
            continue  # the root package re-exports the public API
        own = parts[0]
        assert own in RANK, f"{path.relative_to(ROOT)}: package {own!r} has no layer"
        for name in _imports(path):
            other = name.split(".")[1] if "." in name else ""
            if other in RANK and other != own and RANK[other] >= RANK[own]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_import_linter_contracts() -> None:
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


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
