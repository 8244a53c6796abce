"""Every ```python block of README.md and docs/*.md runs here, so that documented code cannot
rot. The blocks of one file run in order in one namespace (a page reads top to bottom), in a
temporary folder, starting from :func:`namespace`: the small objects the prose calls ``model``,
``loader``, ``batches``, ``A``/``y`` and so on. The one substitution: the sizes 1_000_000 and
100_000 (written that way in the README) shrink to 10_000 so the block runs in a second. A block
that cannot run on one CPU (torchrun, a transformers Trainer) carries the marker line
``<!-- illustrative: reason -->`` just above its fence; the test counts those so they stay rare.
Citations of docs/algorithms.md sections in the code must name a section that exists."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- illustrative:"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SIZES = {"1_000_000": "10_000", "100_000": "10_000"}


def blocks(page: Path) -> list[tuple[int, str, bool]]:
    """(line number, code, illustrative) of each python block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((line, m.group(1), before.startswith(MARKER)))
    return out


def namespace() -> dict[str, object]:
    """The objects the documentation's prose assumes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
               for _ in range(8)]  # fmt: skip
    rng = np.random.default_rng(0)
    n, d, k = 256, 128, 16  # the README solves with k=64
    A = rng.normal(size=(n, d)) / np.sqrt(n)
    w = np.zeros(d)
    w[:k] = 1.0
    X = rng.normal(size=(n, d))
    return {
        "torch": torch, "F": F, "nn": nn, "np": np,
        "model": model, "model2": copy.deepcopy(model), "model3": copy.deepcopy(model),
        "layer": model[0], "loader": batches, "batches": batches, "calib_batches": batches,
        "val": batches[:2], "val_batches": batches[:2],
        "A": A, "y": A @ w, "k": k, "n": n, "X": X, "labels": (X[:, 0] > 0).astype(float),
    }  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_blocks_run(page: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    ns = namespace()
    data = {k: v for k, v in ns.items() if not k.startswith(("model", "layer"))}
    for line, code, illustrative in blocks(page):
        if illustrative:
            continue
        ns.update(data)  # a loop variable of an earlier block (``for x, y in loader``) is gone
        for big, small in SIZES.items():
            code = code.replace(big, small)
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), ns)
        except Exception as err:
            pytest.fail(f"{page.relative_to(ROOT)} line {line}: {type(err).__name__}: {err}")


def test_few_blocks_are_illustrative() -> None:
    marked = [(p.name, line) for p in PAGES for line, _, skip in blocks(p) if skip]
    total = sum(len(blocks(p)) for p in PAGES)
    assert total >= 10 and len(marked) <= 3, marked


def test_algorithms_citations_exist() -> None:
    text = (ROOT / "docs/algorithms.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", text, re.M)}
    for path in [*(ROOT / "src").rglob("*.py"), *PAGES]:
        text = path.read_text()
        assert "ALGORITHMS.md" not in text, path
        for m in re.finditer(r"algorithms\.md\)? sections? ([\d, and]+)", text):
            for num in re.findall(r"\d+", m.group(1)):
                assert int(num) in sections, (path, m.group(0))
