"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 5) -> dict[str, float]:
    """Median times of several functions run round-robin, so machine noise hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """This machine's dense matmul rate for ``dtype``, measured now."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, reps) / 1e9


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to benchmarks/results/NAME.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    """The short hash of the checked-out commit (empty outside a git checkout), so that a
    result file says which code measured it."""
    import subprocess

    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fill_topk_window(op: Any, generator: torch.Generator) -> None:
    """Fill every slot of a top-k window (``TopKSlidingInverseFisher``) with a random sparse
    row and rebuild K, so that a timing sees a full window without pushing m real gradients.

    Each row keeps one random coordinate per stratum of d/k coordinates (sorted and distinct,
    O(k) to draw); at these densities such rows are near-orthogonal, so K is their squared
    norms on the diagonal plus the damping."""
    m, k, dim = op.window, op.k, op.dim
    stride = dim // k
    base = torch.arange(k, dtype=torch.int64) * stride
    norms = torch.empty(m, dtype=torch.float64)
    chunk = getattr(getattr(op, "rows", None), "rows", 1)  # the C layout's group size
    for r in range(0, m, chunk):  # a group at a time: no m x k temporaries beside the window
        n = min(chunk, m - r)
        indices = base + torch.randint(0, stride, (n, k), generator=generator)
        values = torch.randn(n, k, generator=generator).to(op.dtype)
        op.write_rows(r, values, indices)
        norms[r : r + n] = values.double().square().sum(dim=1)
    gram = torch.diag(norms)  # G G^T
    if op.damp is not None:  # K = m damp I + G G^T (MFAC's windows are undamped: damp None)
        gram = gram + m * op.damp * torch.eye(m, dtype=torch.float64)
    op.factor.rebuild(gram)
