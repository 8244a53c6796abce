"""The measurements behind three design choices of the operators (docs/operators.md).

1. Threads: small ops (a dot over one gradient, a batch of small Cholesky solves) on all
   threads against one thread, the reason for ``mfac.operators.threads.single_threaded``.
2. Low-precision kernels: one pass over a bf16 window with stock torch, the compiled kernel
   and float32, the reason for ``mfac.operators.kernels``.
3. bf16 ``push_ihvp`` semantics: the first step with F^-1 of the stored (rounded) gradient
   against F^-1 of the unrounded one, both compared with the normalised-gradient step.
4. mfac-exact's greedy trace (``mfac.prune.methods.mfac_exact``): rewriting the B x B inverse with a
   rank-one downdate per removal (two passes: trace, then replay) against the low-rank factor
   form (one trace pass, then a joint Cholesky solve), and cache-sized against large chunks.

Run: ``python -m benchmarks.design_checks [--only NAME ...]``; writes
benchmarks/results/design_checks.json (parts not run keep their previous result).
"""

from __future__ import annotations

import functools
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
            # the eager fallback's scheme (BLAS on float32 column tiles) at cache-sized widths
            **{
                f"tiled_{n}_bf16_cols": functools.partial(kernels._cols_dot_eager, g16, c, n)
                for n in (1024, 4096, 16384)
            },
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
    out["cols"]["tiled_bf16_over_f32"] = {
        n: t[f"tiled_{n}_bf16_cols"] / t["f32_cols"] for n in (1024, 4096, 16384)
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


def _rank_one_greedy(hinv: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """The plain batched greedy: every removal rewrites the (nb, B, B) inverse (rank-one)."""
    h, w = hinv.clone(), w.clone()
    rows = torch.arange(w.shape[0])
    removed = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(steps):
        d = h.diagonal(dim1=1, dim2=2)
        p = torch.where(removed, torch.inf, w.square() / d).argmin(1)
        col = h[rows, :, p]
        dp = d[rows, p]
        w -= (w[rows, p] / dp)[:, None] * col
        h.baddbmm_((col / dp[:, None])[:, :, None], col[:, None, :], alpha=-1.0)
        w[rows, p] = 0.0
        removed[rows, p] = True
    return w


def greedy(size: int = 1024, blocks: int = 4) -> dict:
    """mfac-exact's trace over ``blocks`` blocks of size B: seconds per block, same run."""
    from mfac.prune.methods.mfac_exact import greedy_obs, joint_removal

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(blocks, size, size // 2, dtype=F64, generator=gen)
    hinv = torch.linalg.inv(a @ a.transpose(1, 2) / size + 0.1 * torch.eye(size, dtype=F64))
    w = torch.randn(blocks, size, dtype=F64, generator=gen)
    real = torch.ones(blocks, size, dtype=torch.bool)
    counts = torch.full((blocks,), size * 9 // 10)

    def factor_form(chunk: int) -> None:
        for b0 in range(0, blocks, chunk):
            sl = slice(b0, b0 + chunk)
            _, order = greedy_obs(hinv[sl], w[sl], real[sl], size)
            joint_removal(hinv[sl], w[sl], order, counts[sl])

    with single_threaded():
        times = interleaved_medians(
            {
                "rank_one_two_pass": lambda: [_rank_one_greedy(hinv, w, size) for _ in range(2)],
                "factor_chunk_all": lambda: factor_form(blocks),
                "factor_chunk_1": lambda: factor_form(1),
            },
            reps=1,
        )
    per_block = {k: v / blocks for k, v in times.items()}
    return {
        "block_size": size,
        "blocks": blocks,
        "seconds_per_block": per_block,
        "speedup_vs_rank_one": per_block["rank_one_two_pass"] / per_block["factor_chunk_1"],
    }


PARTS = {
    "threads": threads,
    "low_precision_passes": low_precision_passes,
    "bf16_first_step": bf16_first_step,
    "greedy": greedy,
}


def main() -> dict:
    import argparse
    import json

    from benchmarks.common import RESULTS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS))
    args = ap.parse_args()
    path = RESULTS / "design_checks.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["machine"] = machine()
    for name in args.only:
        result[name] = PARTS[name]()
        print(name, json.dumps(result[name], indent=1), flush=True)
    path = write_json("design_checks", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
