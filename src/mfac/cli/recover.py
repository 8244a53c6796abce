"""``mfac recover``: sparse recovery min f(x) s.t. ||x||_0 <= k on A, y read from .npz/.npy,
with :func:`mfac.recovery.solve` (I-OBS, IHT, NIHT, HTP, CoSaMP, OMP)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..experiments.report import text_table
from .common import (
    CLIError,
    atomic_dir,
    check_replaceable,
    emit,
    existing_path,
    one_line,
    set_threads,
    write_json,
)
from .options import resolve

log = logging.getLogger("mfac.cli")
TRUTH_KEYS = ("x_true", "w_true", "x_star", "w")


def read_problem(data: Path, y_path: Path | None) -> tuple[np.ndarray, np.ndarray, Any]:
    """A, y (and the true x when the .npz holds one) from an .npz, or from two .npy files."""
    data = existing_path(data, "data")
    try:
        if data.suffix == ".npz":
            if y_path is not None:
                raise CLIError("--y is only used when --data is A as .npy")
            with np.load(data, allow_pickle=False) as z:
                keys = list(z.keys())
                if "A" not in keys or "y" not in keys:
                    raise CLIError(f"{data}: an .npz needs arrays named A and y; found {keys}")
                A, y = np.asarray(z["A"]), np.asarray(z["y"])
                tk = next((k for k in TRUTH_KEYS if k in keys), None)
                truth = None if tk is None else np.asarray(z[tk], dtype=np.float64)
        elif data.suffix == ".npy":
            if y_path is None:
                raise CLIError("--data A.npy needs --y y.npy")
            A = np.load(data, allow_pickle=False)
            y = np.load(existing_path(y_path, "y"), allow_pickle=False)
            truth = None
        else:
            raise CLIError(f"--data {data}: expected .npz (A, y) or .npy (A, with --y)")
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"could not read {data}: {one_line(err)}") from None
    for name, arr in (("A", A), ("y", y)):
        if not np.issubdtype(arr.dtype, np.number):
            raise CLIError(f"{name} must be numeric, got dtype {arr.dtype}")
    return A.astype(np.float64), y.astype(np.float64), truth


def run_recover(args: argparse.Namespace) -> int:
    """Solve, print a summary, write recovery.npz and recovery.json atomically."""
    got = resolve(args, "recover", strict=True)
    cmd, options = got.command, got.method
    check_replaceable(cmd.output, probe=True)
    set_threads(cmd.threads)
    from ..recovery import solve

    A, y, truth = read_problem(cmd.data, cmd.y)
    log.info("solving: A %s, y %s, k=%d, %s (%s)", A.shape, y.shape, cmd.k, cmd.method, cmd.loss)
    t0 = time.perf_counter()
    res = solve(A, y, cmd.k, method=cmd.method, max_iter=cmd.max_iter, tol=cmd.tol,
                loss=cmd.loss, history=True, **options)  # fmt: skip
    summary: dict[str, Any] = {
        "command": "recover", "data": cmd.data, "shape": list(A.shape), "k": cmd.k,
        "method": cmd.method, "loss_kind": cmd.loss, "options": options,
        "iterations": res.iterations, "converged": res.converged, "loss": res.loss,
        "nonzeros": int(np.count_nonzero(res.x)), "support": [int(i) for i in res.support],
        "wall_s": time.perf_counter() - t0,
        "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool))},
    }  # fmt: skip
    if truth is not None and truth.shape == res.x.shape:
        err = float(np.linalg.norm(res.x - truth))
        summary["error"] = err
        summary["relative_error"] = err / max(float(np.linalg.norm(truth)), 1e-300)
        true = set(np.flatnonzero(truth).tolist())
        summary["support_recall"] = len(true & set(summary["support"])) / len(true) if true else 1.0
    with atomic_dir(cmd.output) as tmp:
        history = np.asarray(res.history or [], dtype=np.float64)
        np.savez(tmp / "recovery.npz", x=res.x, support=res.support, history=history)
        write_json(tmp / "recovery.json", summary)
    cols = ["method", "iterations", "converged", "loss", "nonzeros", "wall_s"]
    cols += [c for c in ("relative_error", "support_recall") if c in summary]
    emit(text_table([summary], cols))
    emit(f"wrote {cmd.output}/ (recovery.npz: x, support, history; recovery.json)")
    return 0
