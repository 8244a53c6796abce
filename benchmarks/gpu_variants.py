"""CUDA variant study behind docs/operators.md "The run on an NVIDIA H200": which batched call of
the direct build costs what, and which bfloat16 pass shapes were tried for the window.

1. For nb blocks of 128 x 128 float64 SPD matrices (nb = 512, 8192): the Gram (``bmm``),
   ``cholesky_ex``, ``cholesky_inverse`` (potri), a batched triangular solve then W^T W (the
   path the build takes on a GPU), ``inv_ex`` and ``eigh``; and one 1024 x 1024 Cholesky and
   ``eigh``.
2. For a bfloat16 window (m = 256, d = 2^23; m = 1024, d = 2^22): the float32 passes, stock
   bfloat16 products (which round their outputs to bfloat16), a float32-output cuBLAS product
   (``torch.mm(..., out_dtype=torch.float32)``) against the vector split into three bfloat16
   parts (exact to float32; tried and not kept), the same product split over d by hand, and
   the library's own passes (``mfac.operators.kernels``), with their errors against float64.

Medians of 7 timed calls (3 for ``eigh``) after one warm-up, each followed by a device
synchronisation. Run: ``python -m benchmarks.gpu_variants`` on a CUDA machine; writes
benchmarks/results/gpu-variants.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mfac.operators import kernels

from benchmarks.common import write_json

F64 = torch.float64
SPLIT_K_COLUMNS = 65536


def median_seconds(fn: Callable[[], object], reps: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def direct_build_pieces(device: torch.device) -> dict:
    out = {}
    for nb in (512, 8192):
        b, m = 128, 1024
        g = torch.randn(nb, m, b, dtype=F64, device=device)
        mats = torch.bmm(g.transpose(1, 2), g) / m
        mats.diagonal(dim1=1, dim2=2).add_(1e-3)
        chol = torch.linalg.cholesky(mats)
        eye = torch.eye(b, dtype=F64, device=device).expand_as(mats)

        def trsm_plus_bmm(chol=chol, eye=eye):
            inv_l = torch.linalg.solve_triangular(chol, eye, upper=False)
            return torch.bmm(inv_l.transpose(1, 2), inv_l)

        out[f"nb{nb}"] = {
            "gram_bmm": median_seconds(lambda g=g: torch.bmm(g.transpose(1, 2), g)),
            "cholesky_ex": median_seconds(lambda mats=mats: torch.linalg.cholesky_ex(mats)),
            "cholesky_inverse": median_seconds(lambda chol=chol: torch.cholesky_inverse(chol)),
            "trsm_plus_bmm": median_seconds(trsm_plus_bmm),
            "inv_ex": median_seconds(lambda mats=mats: torch.linalg.inv_ex(mats)),
            "eigh": median_seconds(lambda mats=mats: torch.linalg.eigh(mats), reps=3),
        }
        print(nb, {k: f"{v * 1e3:.2f} ms" for k, v in out[f"nb{nb}"].items()}, flush=True)
    a = torch.randn(1024, 1024, dtype=F64, device=device)
    a = a @ a.T + 1024 * torch.eye(1024, dtype=F64, device=device)
    out["m1024"] = {
        "cholesky_ex": median_seconds(lambda: torch.linalg.cholesky_ex(a)),
        "eigh": median_seconds(lambda: torch.linalg.eigh(a), reps=3),
    }
    return out


def split3(v: torch.Tensor) -> torch.Tensor:
    """float32 (n, k) -> bfloat16 (n, 3k): hi, mid, lo parts whose float32 sum is v."""
    hi = v.to(torch.bfloat16)
    rest = v - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.cat([hi, mid, (rest - mid.float()).to(torch.bfloat16)], 1)


def split_k_rows(g: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """G @ parts with float32 output, reduced over column chunks of G by one batched product."""
    m, d = g.shape
    chunks = d // SPLIT_K_COLUMNS
    main = chunks * SPLIT_K_COLUMNS
    lhs = g[:, :main].view(m, chunks, SPLIT_K_COLUMNS).transpose(0, 1)
    rhs = parts[:main].view(chunks, SPLIT_K_COLUMNS, -1)
    out = torch.bmm(lhs, rhs, out_dtype=torch.float32).sum(0)
    if main < d:
        out += torch.mm(g[:, main:], parts[main:], out_dtype=torch.float32)
    return out


def bf16_pass_row(m: int, d: int, device: torch.device) -> dict:
    """Every pass variant on one bfloat16 window of m x d (and its float32 original)."""
    g32 = torch.randn(m, d, device=device)
    g = g32.bfloat16()
    x, c = torch.randn(d, 1, device=device), torch.randn(m, 1, device=device)
    px, pc = split3(x), split3(c)
    row = {
        "f32_rows": median_seconds(lambda: g32 @ x),
        "f32_cols": median_seconds(lambda: g32.T @ c),
        "stock_bf16_rows": median_seconds(lambda: g @ x.bfloat16()),
        "stock_bf16_cols": median_seconds(lambda: g.T @ c.bfloat16()),
        "mm_rows": median_seconds(lambda: torch.mm(g, px, out_dtype=torch.float32)),
        "splitk_rows": median_seconds(lambda: split_k_rows(g, px)),
        "mm_cols": median_seconds(lambda: torch.mm(g.T, pc, out_dtype=torch.float32)),
        "dispatch_rows": median_seconds(lambda: kernels.rows_dot(g, x)),
        "dispatch_cols": median_seconds(lambda: kernels.cols_dot(g, c)),
    }
    exact_rows, exact_cols = g.double() @ x.double(), g.double().T @ c.double()
    row["dispatch_rows_relerr"] = float(
        (kernels.rows_dot(g, x).double() - exact_rows).norm() / exact_rows.norm()
    )
    row["dispatch_cols_relerr"] = float(
        (kernels.cols_dot(g, c).double() - exact_cols).norm() / exact_cols.norm()
    )
    print(m, d, {k: f"{v:.3g}" for k, v in row.items()}, flush=True)
    return row


def bf16_pass_variants(device: torch.device) -> dict:
    out = {}
    for m, d in ((256, 2**23), (1024, 2**22)):
        out[f"m{m}_d{d}"] = bf16_pass_row(m, d, device)
        torch.cuda.empty_cache()
    return out


def main() -> dict:
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_variants needs a CUDA device (torch {torch.__version__})")
    device = torch.device("cuda")
    result = {
        "note": (
            "CUDA variant study (python -m benchmarks.gpu_variants): batched pieces of the "
            "direct build for nb blocks of 128x128 float64 (seconds), and bf16 pass variants "
            "(seconds) against float32 passes"
        ),
        "device": torch.cuda.get_device_name(device),
        "direct_build_pieces_s": direct_build_pieces(device),
        "bf16_pass_variants_s": bf16_pass_variants(device),
    }
    print(f"wrote {write_json('gpu-variants', result)}")
    return result


if __name__ == "__main__":
    main()
