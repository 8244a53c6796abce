"""Speed of the M-FAC operators, as ratios measured in one run.

1. The optimizer step ``push_ihvp`` against its memory-bandwidth floor: two plain matrix-vector
   passes (``G @ x`` then ``y @ G``) over the same m x d float32 buffer. bfloat16 storage is
   compared with the same float32 floor (its own floor is 0.5x, half the bytes), next to stock
   torch bfloat16 matrix-vector products.
2. The static precompute (Gram, Cholesky, triangular solve or block inverses) in GFLOP/s,
   against this machine's float32 and float64 matmul rates measured in the same run.
3. The BLAS-3 precompute against the paper's rank-one recursion (a loop over m): full M-FAC,
   and blocked (B = 128, the recursion batched over blocks) including ``diag()``.

Run: ``python -m benchmarks.operators`` (full) or ``--quick`` (~1 min); ``--device cuda`` runs
every part on a GPU (``make gpu-check``). Writes benchmarks/results/operators.json
(operators-quick.json; gpu.json / gpu-quick.json on CUDA) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mfac import InverseFisher, SlidingInverseFisher

from benchmarks.common import interleaved_medians, machine, table, write_json
from benchmarks.rank_one import BlockRankOneInverseFisher, RankOneInverseFisher

F64 = torch.float64
DEVICE = torch.device("cpu")  # set by --device


def synced(fn):
    """``fn`` followed by a device synchronisation, so that wall time measures the work."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The device's dense matmul rate for ``dtype``, measured now (median of ``reps``)."""
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    t = interleaved_medians({"mm": synced(lambda: a @ b)}, reps)["mm"]
    return 2 * n**3 / t / 1e9


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


def filled_window(grads: torch.Tensor, damp: float) -> SlidingInverseFisher:
    """A sliding operator whose window already holds ``grads`` (K and K^-1 consistent)."""
    m, d = grads.shape
    op = SlidingInverseFisher(d, m, damp, dtype=grads.dtype, device=grads.device)
    op.grads = grads
    gram = torch.zeros(m, m, dtype=F64, device=grads.device)
    for c in range(0, d, 65536):  # float32 tiles: a step's time does not depend on K's digits
        tile = grads[:, c : c + 65536].float()
        gram += (tile @ tile.T).to(F64)
    gram.diagonal().add_(m * damp)
    op.factor.rebuild(gram)
    return op


def bench_step(m: int, d: int, reps: int, stock_bf16: bool) -> dict:
    """push_ihvp (float32 and bfloat16 storage) against the two-pass float32 floor."""
    torch.manual_seed(0)
    g32 = randn(m, d)
    op32 = filled_window(g32, 1e-4)
    op16 = filled_window(g32.bfloat16(), 1e-4)
    x, c = randn(d), randn(m)
    # Distinct gradients, as in training: pushing one vector m times makes the window's rows
    # identical, and then float32 dot products cannot keep K positive definite at small damp.
    # A pool of min(m + 1, 64) rows: each window sees far fewer pushes than that, and at
    # m = 1024, d = 1e6 a pool of m + 1 rows would need another 4 GB.
    pool = randn(min(m + 1, 64), d)
    count = iter(range(10**9))

    def grad() -> torch.Tensor:
        return pool[next(count) % pool.shape[0]]

    fns = {
        "floor_f32": lambda: (g32 @ x, c @ g32),
        "push_ihvp_f32": lambda: op32.push_ihvp(grad()),
        "push_ihvp_bf16": lambda: op16.push_ihvp(grad()),
    }
    if stock_bf16:
        g16, x16, c16 = op16.grads, x.bfloat16(), c.bfloat16()
        fns["stock_bf16_two_pass"] = lambda: (g16 @ x16, c16 @ g16)
    t = interleaved_medians({name: synced(fn) for name, fn in fns.items()}, reps)
    floor = t["floor_f32"]
    row = {
        "m": m,
        "d": d,
        "floor_f32_s": floor,
        "floor_GBps": 2 * m * d * 4 / floor / 1e9,
        "push_ihvp_f32_s": t["push_ihvp_f32"],
        "f32_over_floor": t["push_ihvp_f32"] / floor,
        "push_ihvp_bf16_s": t["push_ihvp_bf16"],
        "bf16_over_f32_floor": t["push_ihvp_bf16"] / floor,
    }
    if stock_bf16:
        row["stock_bf16_over_f32_floor"] = t["stock_bf16_two_pass"] / floor
    return row


def precompute_flops(m: int, d: int, size: int) -> tuple[float, float]:
    """(honest, previous) flop counts of a static build with blocks of ``size`` coordinates.

    Honest: what the exact method needs, with each product counted once. Direct form (B <= m):
    the symmetric Gram G_b^T G_b is m*B^2 flops per block (one triangle), Cholesky B^3/3 and
    the inverse from it 2B^3/3, so m*B*d + B^2*d in all. Woodbury: the symmetric Gram m^2 d,
    one m x m Cholesky per block, the triangular solve m^2 d. Previous: the count of the first
    benchmark (both Gram triangles, and 2B^3 for the inverse), kept for comparison."""
    if size <= m:
        honest = m * size * d + d * size**2
        previous = 2 * m * size * d + d * size**2 / 3 + 2 * d * size**2
    else:
        honest = 2 * m * m * d + (d // size) * m**3 / 3
        previous = 3 * m * m * d + (d // size) * m**3 / 3
    return honest, previous


def gram_shaped_matmul(m: int, d: int, size: int, reps: int) -> float:
    """float64 GFLOP/s of the plain product that has the Gram's shape: the batched
    (nblocks, B, m) @ (nblocks, m, B) for the direct form, (m, d) @ (d, m) for Woodbury
    (the full product, 2*m*B*d or 2*m^2*d flops)."""
    size = min(size, d)
    if size <= m:
        nblocks = d // size
        a = torch.randn(nblocks, size, m, dtype=F64, device=DEVICE)
        b = torch.randn(nblocks, m, size, dtype=F64, device=DEVICE)
        t = interleaved_medians({"bmm": synced(lambda: torch.bmm(a, b))}, reps)["bmm"]
        return 2 * nblocks * size * m * size / t / 1e9
    g = torch.randn(m, d, dtype=F64, device=DEVICE)
    t = interleaved_medians({"mm": synced(lambda: g @ g.T)}, reps)["mm"]
    return 2 * m * m * d / t / 1e9


def bench_precompute(m: int, d: int, blocks: list[int | None], reps: int) -> list[dict]:
    """Static precompute GFLOP/s (honest count, see :func:`precompute_flops`) against the
    float32/float64 2048 x 2048 matmul rates and the Gram-shaped float64 product, all measured
    in the same run, the builds interleaved with the matmuls. On the CPU the direct form is
    also timed through the batched torch/LAPACK path (the fallback without a C compiler)."""
    import mfac.operators.blocks as blocks_module

    torch.manual_seed(1)
    master = randn(m, d)
    work = torch.empty_like(master)
    native = blocks_module.native_build_enabled
    rows = []
    for block in blocks:
        size = d if block is None else min(block, d)
        direct = size <= m
        paths = ["native", "torch"] if direct and DEVICE.type == "cpu" else ["default"]
        times: dict[str, list[float]] = {path: [] for path in paths}
        f32, f64 = [], []
        for _ in range(reps):
            f32.append(matmul_gflops(torch.float32, reps=3))
            for path in paths:
                blocks_module.native_build_enabled = native if path != "torch" else lambda: False
                try:
                    work.copy_(master)  # the operator consumes its input in place
                    start = time.perf_counter()
                    synced(lambda b=block: InverseFisher(work, 1e-5, b))()
                    times[path].append(time.perf_counter() - start)
                finally:
                    blocks_module.native_build_enabled = native
            f64.append(matmul_gflops(F64, reps=3))
        mm32, mm64 = statistics.median(f32), statistics.median(f64)
        shaped = gram_shaped_matmul(m, d, size, reps)
        honest, previous = precompute_flops(m, d, size)
        for path in paths:
            seconds = statistics.median(times[path])
            rate = honest / seconds / 1e9
            rows.append(
                {
                    "m": m,
                    "d": d,
                    "block": "full" if block is None else block,
                    "form": ("direct" if direct else "woodbury")
                    + (" (torch/LAPACK path)" if path == "torch" else ""),
                    "seconds": seconds,
                    "GFLOPs": rate,
                    "flops": honest,
                    "matmul_f32_GFLOPs": mm32,
                    "matmul_f64_GFLOPs": mm64,
                    "gram_shaped_f64_GFLOPs": shaped,
                    "ratio_to_f32_matmul": rate / mm32,
                    "ratio_to_f64_matmul": rate / mm64,
                    "ratio_to_gram_shaped_f64": rate / shaped,
                    "ratio_to_f64_matmul_previous_count": previous / seconds / 1e9 / mm64,
                }
            )
    return rows


def bench_rank_one(m: int, d: int, reps: int) -> dict:
    """Our BLAS-3 precompute against the paper's rank-one recursion (same F, same answers)."""
    torch.manual_seed(2)
    grads = randn(m, d)
    x = randn(d)
    work = torch.empty_like(grads)

    def ours() -> InverseFisher:
        work.copy_(grads)
        return InverseFisher(work, 1e-4)

    t = interleaved_medians(
        {"ours": synced(ours), "rank_one": synced(lambda: RankOneInverseFisher(grads, 1e-4))},
        reps,
    )
    exact = RankOneInverseFisher(grads.double(), 1e-4).ihvp(x.double())
    agree = float((ours().ihvp(x).double() - exact).norm() / exact.norm())
    return {
        "m": m,
        "d": d,
        "ours_s": t["ours"],
        "rank_one_s": t["rank_one"],
        "speedup": t["rank_one"] / t["ours"],
        "ihvp_rel_diff_vs_float64_recursion": agree,
    }


def bench_block_rank_one(m: int, d: int, block: int, reps: int) -> dict:
    """Blocked precompute + ``diag()`` against the rank-one recursion batched over the blocks
    (a loop over the m gradients), with the float64 matmul rate measured in the same run."""
    torch.manual_seed(3)
    grads = randn(m, d)
    work = torch.empty_like(grads)
    damp = 1e-4

    def ours() -> torch.Tensor:
        return InverseFisher(work, damp, block).diag()

    def rank_one() -> torch.Tensor:
        return BlockRankOneInverseFisher(grads, damp, block).diag()

    import mfac.operators.blocks as blocks_module

    native = blocks_module.native_build_enabled

    def ours_lapack() -> torch.Tensor:  # the direct blocks through batched torch/LAPACK calls
        blocks_module.native_build_enabled = lambda: False
        try:
            return ours()
        finally:
            blocks_module.native_build_enabled = native

    fns = {"ours": ours, "rank_one": rank_one}
    if DEVICE.type == "cpu":
        fns["ours_lapack"] = ours_lapack
    times: dict[str, list[float]] = {name: [] for name in fns}
    mm64 = []
    for _ in range(reps):
        for name, fn in fns.items():
            work.copy_(grads)  # the Woodbury form consumes its input; not timed
            start = time.perf_counter()
            synced(fn)()
            times[name].append(time.perf_counter() - start)
        mm64.append(matmul_gflops(F64, reps=3))
    ours_s, rank_one_s = (sorted(times[k])[reps // 2] for k in ("ours", "rank_one"))
    mm = sorted(mm64)[reps // 2]
    flops = precompute_flops(m, d, min(block, d))[0]
    exact = BlockRankOneInverseFisher(grads.double(), damp, block).diag()
    work.copy_(grads)
    agree = float((ours().double() - exact).norm() / exact.norm())
    row = {
        "m": m,
        "d": d,
        "block": block,
        "ours_s": ours_s,
        "rank_one_s": rank_one_s,
        "speedup": rank_one_s / ours_s,
        "ours_ratio_to_f64_matmul": flops / ours_s / 1e9 / mm,
        "matmul_f64_GFLOPs": mm,
        "diag_rel_diff_vs_float64_recursion": agree,
    }
    if "ours_lapack" in times:
        lapack_s = statistics.median(times["ours_lapack"])
        row["ours_lapack_path_s"] = lapack_s
        row["lapack_path_speedup"] = rank_one_s / lapack_s
    return row


def bench_oneshot(
    models: list[str], reps: int, num_grads: tuple[int, ...] = (64, 256)
) -> list[dict]:
    """End to end: ``mfac.prune.oneshot(..., method="mfac", recompute=16)`` (B = 128, the
    library's defaults otherwise) on benchmarks.prune's MLPs, with m = 64 (the default: B > m,
    Woodbury blocks) and m = 256 (B <= m, direct blocks); medians of the precompute time (the
    static builds, one per recomputation) and of the whole call, with the blocks built by the
    C kernels and, interleaved, by the batched torch/LAPACK path."""
    import mfac.operators.blocks as blocks_module
    import mfac.prune as mp

    from benchmarks.prune import batches, load_tasks, loss_fn

    tasks = load_tasks()
    rows = []
    native = blocks_module.native_build_enabled
    paths = ["native", "lapack"]
    for name in models:
        task = tasks[name]
        torch.manual_seed(0)
        state = task.make().state_dict()  # timing only: trained weights cost the same
        data = batches(task, 256, 100)
        for m in num_grads:
            pre: dict[str, list[float]] = {p: [] for p in paths}
            total: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(reps):
                for path in paths:
                    model = task.make()
                    model.load_state_dict(state)
                    if path == "lapack":
                        blocks_module.native_build_enabled = lambda: False
                    try:
                        res = mp.oneshot(
                            model, 0.9, "mfac", data=data, loss_fn=loss_fn, recompute=16,
                            num_grads=m, progress=False,
                        )  # fmt: skip
                    finally:
                        blocks_module.native_build_enabled = native
                    pre[path].append(res.timings["precompute"])
                    total[path].append(res.timings["total"])
            dim = sum(p.numel() for p in model.parameters() if p.ndim > 1)
            med_pre = {p: statistics.median(pre[p]) for p in paths}
            med_tot = {p: statistics.median(total[p]) for p in paths}
            rows.append(
                {
                    "model": name,
                    "d": dim,
                    "m": m,
                    "form": "direct" if m >= 128 else "woodbury",
                    "precompute_s": med_pre["native"],
                    "total_s": med_tot["native"],
                    "precompute_share": med_pre["native"] / med_tot["native"],
                    "precompute_lapack_path_s": med_pre["lapack"],
                    "total_lapack_path_s": med_tot["lapack"],
                    "precompute_speedup": med_pre["lapack"] / med_pre["native"],
                    "total_speedup": med_tot["lapack"] / med_tot["native"],
                }
            )
    return rows


def plot(result: dict, path: str) -> None:
    """Two panels: step time over the floor, and precompute rate over the matmul rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, part in zip(axes, ("step", "precompute"), strict=True):
        if part not in result:
            ax.axis("off")
    if "step" in result:
        ax = axes[0]
        labels = [f"m={r['m']}\nd={r['d']:.0e}" for r in result["step"]]
        series = [
            ("f32_over_floor", "push_ihvp float32"),
            ("bf16_over_f32_floor", "push_ihvp bfloat16 (compiled)"),
            ("stock_bf16_over_f32_floor", "stock torch bf16 2 passes"),
        ]
        width = 0.26
        for i, (key, name) in enumerate(series):
            vals = [r.get(key, float("nan")) for r in result["step"]]
            ax.bar([j + (i - 1) * width for j in range(len(vals))], vals, width, label=name)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="float32 floor (2 passes)")
        ax.axhline(0.5, color="grey", lw=1, ls=":", label="bf16 floor (half the bytes)")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("time / float32 two-pass floor")
        ax.set_yscale("log")
        ax.set_title("optimizer step vs memory-bandwidth floor")
        ax.legend(fontsize=7)
    if "precompute" in result:
        ax = axes[1]
        rows = result["precompute"]
        labels = [
            f"m={r['m']} B={r['block']}\n{r['form'].replace(' (torch/LAPACK path)', ', LAPACK')}"
            for r in rows
        ]
        xs = range(len(rows))
        ax.bar(
            [x - 0.18 for x in xs],
            [r["ratio_to_f64_matmul"] for r in rows],
            0.36,
            label="vs float64 2048^2 matmul",
        )
        ax.bar(
            [x + 0.18 for x in xs],
            [r.get("ratio_to_gram_shaped_f64", float("nan")) for r in rows],
            0.36,
            label="vs float64 Gram-shaped product",
        )
        ax.axhline(0.5, color="k", lw=1, ls="--", label="target 0.5")
        ax.set_xticks(list(xs), labels, fontsize=6)
        ax.set_ylabel("GFLOP/s (honest count) / matmul GFLOP/s")
        ax.set_title(f"static precompute (d={rows[0]['d']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(before_path: str, after_path: str) -> str:
    """A Markdown table of the precompute parts of two result files (before -> after)."""
    import json

    a, b = (json.loads(open(p).read()) for p in (before_path, after_path))
    lines = ["| measurement | before | after | after / before |", "|---|---|---|---|"]

    def row(name: str, x: float, y: float, fmt: str = ".3g") -> None:
        lines.append(f"| {name} | {x:{fmt}} | {y:{fmt}} | {y / x:.2f} |")

    for ra, rb in zip(a.get("precompute", []), b.get("precompute", []), strict=False):
        tag = f"B={ra['block']} ({ra['form']}), m={ra['m']}, d={ra['d']}"
        row(f"{tag}: seconds", ra["seconds"], rb["seconds"])
        row(
            f"{tag}: share of float64 matmul rate",
            ra["ratio_to_f64_matmul"],
            rb["ratio_to_f64_matmul"],
        )
    if "block_rank_one" in a and "block_rank_one" in b:
        ra, rb = a["block_rank_one"], b["block_rank_one"]
        tag = f"B={ra['block']}, m={ra['m']}, d={ra['d']}"
        row(f"{tag}: precompute + diag, seconds", ra["ours_s"], rb["ours_s"])
        row(f"{tag}: speed-up over the batched rank-one recursion", ra["speedup"], rb["speedup"])
    for ra, rb in zip(a.get("oneshot", []), b.get("oneshot", []), strict=False):
        tag = f"oneshot mfac recompute=16, {ra['model']} (d={ra['d']}, m={ra.get('m', 64)})"
        row(f"{tag}: precompute s", ra["precompute_s"], rb["precompute_s"])
        row(f"{tag}: total s", ra["total_s"], rb["total_s"])
    for ra, rb in zip(a.get("step", []), b.get("step", []), strict=False):
        tag = f"step m={ra['m']}, d={ra['d']:.0e}"
        row(f"{tag}: float32 push_ihvp / floor", ra["f32_over_floor"], rb["f32_over_floor"])
        row(
            f"{tag}: bf16 push_ihvp / float32 floor",
            ra["bf16_over_f32_floor"],
            rb["bf16_over_f32_floor"],
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per median (>= 5)")
    every = ["step", "precompute", "rank_one", "block_rank_one", "oneshot"]
    parser.add_argument("--only", choices=every, nargs="*", help="run some parts")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: writes gpu.json)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precompute-d", type=int, default=None, help="d of the precompute part")
    parser.add_argument(
        "--precompute-m",
        type=int,
        nargs="*",
        default=None,
        help="m of the precompute part (default 256 and 1024; --quick: 256)",
    )
    parser.add_argument(
        "--tests-junit",
        default=None,
        help="a pytest JUnit XML report to record with the results (make gpu-check)",
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print a before/after table"
    )
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device available (torch {torch.__version__})")
    parts = set(args.only or every)
    blocked = (256, 2**16, 128)  # the comparison: d = 2^16, m = 256, B = 128
    if args.quick:
        steps, pre, r1 = [(64, 200_000), (256, 200_000)], ([256], 2**16), (64, 2**15)
    else:
        steps, pre, r1 = [(256, 1_000_000), (1024, 1_000_000)], ([256, 1024], 2**20), (256, 2**18)
        if DEVICE.type == "cuda":  # d large enough that one pass is far above launch latency
            steps = [(256, 2**23), (1024, 2**22)]
    pre = (args.precompute_m or pre[0], args.precompute_d or pre[1])
    info = machine()
    if DEVICE.type == "cuda":
        info["device"] = torch.cuda.get_device_name(DEVICE)
        info["cuda"] = torch.version.cuda
    result: dict = {"machine": info, "quick": args.quick, "reps": args.reps}
    if args.tests_junit:
        result["tests"] = junit_counts(args.tests_junit)
    if "step" in parts:
        result["step"] = [bench_step(m, d, args.reps, stock_bf16=m <= 256) for m, d in steps]
        print("\npush_ihvp against the two-pass float32 floor (G @ x, then y @ G)")
        print(
            table(
                result["step"],
                [
                    "m",
                    "d",
                    "floor_GBps",
                    "f32_over_floor",
                    "bf16_over_f32_floor",
                    "stock_bf16_over_f32_floor",
                ],
            )
        )
    if "precompute" in parts:
        result["precompute"] = [
            row for m in pre[0] for row in bench_precompute(m, pre[1], [128, None], args.reps)
        ]
        print("\nstatic precompute (honest flop count) against this machine's matmul rates")
        print(
            table(
                result["precompute"],
                [
                    "m",
                    "d",
                    "block",
                    "form",
                    "seconds",
                    "GFLOPs",
                    "ratio_to_f64_matmul",
                    "ratio_to_gram_shaped_f64",
                    "ratio_to_f64_matmul_previous_count",
                ],
            )
        )
    if "rank_one" in parts:
        result["rank_one"] = bench_rank_one(r1[0], r1[1], args.reps)
        print("\nBLAS-3 precompute against the paper's rank-one recursion")
        print(
            table(
                [result["rank_one"]],
                ["m", "d", "ours_s", "rank_one_s", "speedup", "ihvp_rel_diff_vs_float64_recursion"],
            )
        )
    if "block_rank_one" in parts:
        result["block_rank_one"] = bench_block_rank_one(*blocked, args.reps)
        print("\nblocked precompute + diag against the rank-one recursion batched over blocks")
        print(
            table(
                [result["block_rank_one"]],
                [
                    "m",
                    "d",
                    "block",
                    "ours_s",
                    "rank_one_s",
                    "speedup",
                    "ours_ratio_to_f64_matmul",
                    "lapack_path_speedup",
                    "diag_rel_diff_vs_float64_recursion",
                ],
            )
        )
    if "oneshot" in parts and DEVICE.type == "cpu":
        result["oneshot"] = bench_oneshot(["digits-mlp", "mnist-mlp"], args.reps)
        print("\nmfac.prune.oneshot(..., method='mfac', recompute=16), B = 128")
        columns = ["model", "d", "m", "form", "precompute_s", "total_s", "precompute_share"]
        columns += ["precompute_lapack_path_s", "precompute_speedup", "total_speedup"]
        print(table(result["oneshot"], columns))
    name = "gpu" if DEVICE.type == "cuda" else "operators"
    name += ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    path = write_json(name, result)
    plot(result, str(path.with_suffix(".png")))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    tests = result.get("tests")
    if tests and (tests["failed"] or tests["errors"] or not tests["passed"]):
        raise SystemExit(f"the device tests did not all pass: {tests}")
    return result


def junit_counts(path: str) -> dict:
    """Passed / failed / errors / skipped counts of a pytest JUnit XML report (no report: the
    tests did not run, recorded as zero passed)."""
    import xml.etree.ElementTree as ET
    from pathlib import Path

    if not Path(path).exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "report": "missing"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        case.get("classname", "") + "::" + case.get("name", "")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failing": failed,
        "seconds": float(suite.get("time", 0.0)),
    }


if __name__ == "__main__":
    main()
