"""The measurements behind three design choices of the operators (docs/operators.md).

1. Threads: small ops (a dot over one gradient, a batch of small Cholesky solves) on all
   threads against one thread, the reason for ``mfac.operators.threads.single_threaded``.
2. Low-precision kernels: one pass over a bf16 window with stock torch, the compiled kernel
   and float32, the reason for ``mfac.operators.kernels``.
3. bf16 ``push_ihvp`` semantics: the first step with F^-1 of the stored (rounded) gradient
   against F^-1 of the unrounded one, both compared with the normalised-gradient step.

Run: ``python -m benchmarks.design_checks``; writes benchmarks/results/design_checks.json.
"""

from __future__ import annotations

import os

import torch

from mfac.operators import kernels
from mfac.operators.threads import single_threaded

from benchmarks.common import interleaved_medians, machine, write_json

F64 = torch.float64


def threads() -> dict:
    """Small ops on all threads against one thread, in the same run."""
    x = torch.randn(1_000_000)
    b, m = 64, 128
    a = torch.randn(b, 4 * m, m, dtype=F64)
    chol = torch.linalg.cholesky(a.transpose(1, 2) @ a / (4 * m) + 1e-5 * torch.eye(m, dtype=F64))
    eye = torch.eye(m, dtype=F64).expand(b, m, m)

    def one(fn):
        def run():
            with single_threaded():
                fn()

        return run

    dot = lambda: torch.dot(x, x)  # noqa: E731
    solve = lambda: torch.cholesky_solve(eye, chol)  # noqa: E731
    t = interleaved_medians(
        {"dot_all": dot, "dot_one": one(dot), "solve_all": solve, "solve_one": one(solve)}, 7
    )
    return {
        "threads_available": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "dot_1e6_ms": {"all_threads": t["dot_all"] * 1e3, "one_thread": t["dot_one"] * 1e3},
        "cholesky_solve_64x128_ms": {
            "all_threads": t["solve_all"] * 1e3,
            "one_thread": t["solve_one"] * 1e3,
        },
    }


def low_precision_passes(m: int = 256, d: int = 1_000_000) -> dict:
    """One pass each way over an m x d window: float32, stock bf16, compiled bf16."""
    g32 = torch.randn(m, d)
    g16 = g32.bfloat16()
    x, c = torch.randn(d, 1), torch.randn(m, 1)
    x16, c16 = x.bfloat16(), c.bfloat16()
    t = interleaved_medians(
        {
            "f32_rows": lambda: g32 @ x,
            "f32_cols": lambda: g32.T @ c,
            "stock_bf16_rows": lambda: g16 @ x16,
            "stock_bf16_cols": lambda: g16.T @ c16,
            "compiled_bf16_rows": lambda: kernels.rows_dot(g16, x),
            "compiled_bf16_cols": lambda: kernels.cols_dot(g16, c),
        },
        5,
    )
    out = {"m": m, "d": d, "load_average": os.getloadavg()[0]}
    for kind in ("rows", "cols"):
        base = t[f"f32_{kind}"]
        out[kind] = {
            "f32_ms": base * 1e3,
            "stock_bf16_over_f32": t[f"stock_bf16_{kind}"] / base,
            "compiled_bf16_over_f32": t[f"compiled_bf16_{kind}"] / base,
        }
    return out


def bf16_first_step(m: int = 8, d: int = 300, damp: float = 1e-2) -> dict:
    """Relative distance of two bf16 first steps from the normalised-gradient step."""
    torch.manual_seed(0)
    g = torch.randn(d)
    stored = g.bfloat16().double()
    gram = stored @ stored + m * damp  # K for a window holding only this row
    stored_step = m * stored / gram  # F^-1 g_stored: what push_ihvp returns
    delta = g.double() - stored  # rounding residual, outside the window's span
    unrounded_step = stored_step + (delta - stored * (stored @ delta) / gram) / damp
    ref = m * stored / (m * damp + stored @ stored)
    return {
        "m": m,
        "d": d,
        "damp": damp,
        "stored_step_rel_err": float((stored_step - ref).norm() / ref.norm()),
        "unrounded_step_rel_err": float((unrounded_step - ref).norm() / ref.norm()),
    }


def main() -> dict:
    result = {
        "machine": machine(),
        "threads": threads(),
        "low_precision_passes": low_precision_passes(),
        "bf16_first_step": bf16_first_step(),
    }
    path = write_json("design_checks", result)
    import json

    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
