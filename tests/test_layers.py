"""The package's layers: operators at the bottom; optim, prune, recovery and curvature on them and
independent of each other; the experiments on those; the command line on top. Checked twice:
by import-linter with the contracts in pyproject.toml, and by a walk over every import
statement of src/mfac (so that the check runs even without import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

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
