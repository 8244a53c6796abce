"""Influence measured the way its users measure it: the linear datamodeling score (LDS) and
mislabel detection by self-influence, for M-FAC against EK-FAC / K-FAC (kronfluence) and TRAK
(traker), the gradient dot product and the diagonal Fisher, on sklearn's digits.

Setup per seed: an MLP 64-32-10 (d = 2410) trained full batch (AdamW, a fixed step count, weight
decay) on 1000 digits from a fixed initialisation; every method scores the 200 test examples
against the 1000 training examples at those weights. Then ``--subsets`` models are trained the
same way (same initialisation, same steps) on random halves S_j of the training set, and each
test example's loss under each of them is recorded. A method's prediction for test example t
and subset S_j is -sum_{i in S_j} s[t, i], with s[t, i] = g_t^T P g_i its score (positive:
helpful); LDS is the Spearman correlation of predictions and losses over the subsets, averaged
over the test examples. Mislabel detection: 10 % of the training labels are flipped, the model
is retrained, and each method's self-influence g_i^T P g_i ranks the training examples; the AUC
of finding the flipped ones is reported (with the training loss as a reference ranking).

Damping: absolute lambda = damp_rel * mean(diag(EF)) (the empirical Fisher of all 1000
training gradients) for every method that takes one (M-FAC, the diagonal Fisher, EK-FAC and
K-FAC's damping_factor), over a grid of damp_rel; the tables report each method at the damp_rel
with the best mean over the seeds, and the JSON holds the whole grid.

    python -m benchmarks.curvature_lds                 # 3 seeds, 100 subset models each
    python -m benchmarks.curvature_lds --quick         # 1 seed, 30 subsets, 2 dampings
    python -m benchmarks.curvature_lds --tables        # print the docs' tables from the JSON

The peers need ``pip install --no-deps kronfluence traker einops einconv opt_einsum`` beside
torch; without them their rows report the import error. Writes
benchmarks/results/curvature_lds.json and curvature_lds.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mfac
from mfac import InverseFisher
from mfac.curvature import example_gradients

from .common import RESULTS, git_commit, machine, peak_rss_gib, table, write_json

ce = nn.functional.cross_entropy
N_TRAIN, N_TEST = 1000, 200
STEPS, LR, WD = 300, 1e-2, 1e-3


def xent(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The library's loss convention, loss_fn(model, batch): the batch's mean cross-entropy."""
    return ce(model(batch[0]), batch[1])


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST]


def init_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def fit(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Full-batch AdamW from the seed's initialisation: a deterministic function of the data."""
    model = init_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for _ in range(STEPS):
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    return model


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of two (k, n) matrices."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(1).argsort(1).to(torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-300)


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), scores.double().numpy()))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- methods
# Each returns (scores, seconds, bytes): scores[t, i] = g_t^T P g_i (positive: helpful) for the
# pairwise query, or the self-influence g_i^T P g_i (n_train,) for ``self_only``.
Grads = dict[str, torch.Tensor]


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return example_gradients(model, xent, (x, y), names, batch_size=256, dtype=torch.float32)


def mfac_scores(model, train, test, m, damp, fisher="empirical", self_only=False):
    """M-FAC from the first m training gradients; with fisher="mc" and m > n the training set
    is passed m / n times, so that each example contributes that many label draws."""
    n = len(train[1])
    data = [(train[0][s : s + 250], train[1][s : s + 250]) for s in range(0, n, 250)]
    data = data * -(-m // n)

    def run():
        op = InverseFisher.from_model(
            model, data, xent, m, damp=damp, chunk_size=256, fisher=fisher,
            generator=torch.Generator().manual_seed(0) if fisher == "mc" else None,
        )  # fmt: skip
        if self_only:
            g = per_example(model, *train)
            return (g * (op @ g.T.contiguous()).T).sum(1), op.nbytes
        return -mfac.influence(op, model, xent, train, test), op.nbytes

    (scores, nbytes), secs = timed(run)
    return scores, secs, nbytes


def diag_scores(model, train, test, damp, self_only=False):
    def run():
        g = per_example(model, *train)
        inv = 1.0 / (damp + g.double().square().mean(0))
        if self_only:
            return (g.double().square() * inv).sum(1)
        gt = per_example(model, *test).double()
        return (gt * inv) @ g.double().T

    scores, secs = timed(run)
    return scores, secs, 8 * scores.shape[-1] if self_only else 8 * 2410


def dot_scores(model, train, test, self_only=False):
    def run():
        g = per_example(model, *train)
        if self_only:
            return g.square().sum(1)
        return per_example(model, *test) @ g.T

    scores, secs = timed(run)
    return scores, secs, 0


def kron_scores(model, train, test, strategy, damps, self_only=False):
    """kronfluence's EK-FAC or K-FAC (its default: covariances of the true Fisher, labels drawn
    from the model). Returns {damp: (scores, seconds, bytes)}; the factor fit's time is added
    to every damping's scoring time."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return ce(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, targets = batch
            return ce(model(inputs), targets, reduction="sum")

    import copy
    import logging

    from torch.utils.data import TensorDataset

    logging.disable(logging.WARNING)
    task = Classification()
    wrapped = prepare_model(copy.deepcopy(model), task)
    out: dict[Any, tuple[torch.Tensor, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("lds", wrapped, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        train_set, test_set = TensorDataset(*train), TensorDataset(*test)
        torch.manual_seed(0)
        _, fit_s = timed(
            lambda: analyzer.fit_all_factors(
                "f", train_set, per_device_batch_size=N_TRAIN,
                factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True,
            )
        )  # fmt: skip
        factors = analyzer.load_all_factors("f")
        nbytes = sum(t.numel() * t.element_size() for per in factors.values() for t in per.values())
        for damp in damps:
            args = ScoreArguments(damping_factor=damp)
            if self_only:
                _, secs = timed(
                    lambda args=args: analyzer.compute_self_scores(
                        "s", "f", train_set, per_device_train_batch_size=N_TRAIN,
                        score_args=args, overwrite_output_dir=True,
                    )
                )  # fmt: skip
                scores = analyzer.load_self_scores("s")["all_modules"]
            else:
                _, secs = timed(
                    lambda args=args: analyzer.compute_pairwise_scores(
                        "s", "f", test_set, train_set, per_device_query_batch_size=N_TEST,
                        per_device_train_batch_size=N_TRAIN, score_args=args,
                        overwrite_output_dir=True,
                    )
                )  # fmt: skip
                scores = analyzer.load_pairwise_scores("s")["all_modules"]
            out[damp] = (scores.double(), fit_s + secs, nbytes)
    logging.disable(logging.NOTSET)
    return out


def trak_scores(model, train, test, proj_dim=512, self_only=False):
    """traker's TRAK on one model (no ensemble), CPU projector, float32; ``proj_dim`` below the
    1000 training examples (TRAK's undamped (Phi^T Phi)^-1 is singular past it)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            d = sum(p.numel() for p in model.parameters())
            proj = BasicProjector(
                grad_dim=d, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal,
                device="cpu", dtype=torch.float32,
            )  # fmt: skip
            traker = TRAKer(
                model=model, task="image_classification", train_set_size=N_TRAIN, save_dir=tmp,
                device="cpu", projector=proj, proj_dim=proj_dim, use_half_precision=False,
                logging_level=40,
            )  # fmt: skip
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for s in range(0, N_TRAIN, 250):
                part = (train[0][s : s + 250], train[1][s : s + 250])
                traker.featurize(batch=part, num_samples=250)
            traker.finalize_features()
            targets = train if self_only else test
            n = len(targets[1])
            traker.start_scoring_checkpoint(
                exp_name="q", checkpoint=model.state_dict(), model_id=0, num_targets=n
            )
            for s in range(0, n, 250):
                part = (targets[0][s : s + 250], targets[1][s : s + 250])
                traker.score(batch=part, num_samples=len(part[1]))
            scores = torch.as_tensor(traker.finalize_scores(exp_name="q")).double().T
            return scores.diagonal().clone() if self_only else scores

    scores, secs = timed(run)
    # What TRAK holds: the projected training features and the k x k inverse (float32).
    return scores, secs, 4 * (N_TRAIN * proj_dim + proj_dim**2)


# --------------------------------------------------------------------------- one seed
def method_rows(model, train, test, grid, mean_diag, ms, self_only) -> list[dict[str, Any]]:
    """Every method's scores at the model: rows with method, damp_rel, scores, seconds, bytes."""
    rows: list[dict[str, Any]] = []

    def add(method, rel, result):
        scores, secs, nbytes = result
        rows.append({"method": method, "damp_rel": rel, "scores": scores, "seconds": secs,
                     "bytes": nbytes})  # fmt: skip

    add("gradient dot product", None, dot_scores(model, train, test, self_only))
    for rel in grid:
        damp = rel * mean_diag
        add("diagonal EF", rel, diag_scores(model, train, test, damp, self_only))
        for m in ms:
            add(f"M-FAC m={m}", rel, mfac_scores(model, train, test, m, damp, self_only=self_only))
        for draws in (1, 2):
            m = draws * N_TRAIN
            add(f"M-FAC m={m} (mc Fisher, {draws} draws)", rel,
                mfac_scores(model, train, test, m, damp, "mc", self_only))  # fmt: skip
    for strategy, label in (("ekfac", "EK-FAC (kronfluence)"), ("kfac", "K-FAC (kronfluence)")):
        try:
            damps = [None] + [rel * mean_diag for rel in grid]
            res = kron_scores(model, train, test, strategy, damps, self_only)
            add(label + " default damping", None, res[None])
            for rel in grid:
                add(label, rel, res[rel * mean_diag])
        except ImportError as err:
            rows.append({"method": label, "damp_rel": None, "error": repr(err)})
    try:
        add("TRAK (traker, 1 model)", None, trak_scores(model, train, test, self_only=self_only))
    except ImportError as err:
        rows.append({"method": "TRAK (traker, 1 model)", "damp_rel": None, "error": repr(err)})
    return rows


def lds_study(seed: int, subsets: int, grid: list[float], ms: list[int]) -> dict[str, Any]:
    xtr, ytr, xte, yte = digits(seed)
    model, train_s = timed(lambda: fit(seed, xtr, ytr))
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    g = per_example(model, xtr, ytr)
    mean_diag = float(g.double().square().mean())
    rows = method_rows(model, (xtr, ytr), (xte, yte), grid, mean_diag, ms, self_only=False)
    gen = torch.Generator().manual_seed(1000 + seed)
    masks = torch.zeros(subsets, N_TRAIN)
    losses = torch.empty(N_TEST, subsets)
    start = time.perf_counter()
    for j in range(subsets):
        idx = torch.randperm(N_TRAIN, generator=gen)[: N_TRAIN // 2]
        masks[j, idx] = 1.0
        sub = fit(seed, xtr[idx], ytr[idx])
        with torch.no_grad():
            losses[:, j] = ce(sub(xte), yte, reduction="none")
    subsets_s = time.perf_counter() - start
    for row in rows:
        if "scores" in row:
            pred = -(row.pop("scores").double() @ masks.double().T)
            lds = spearman(pred, losses.double())
            row["lds"] = float(lds.mean())
    print(f"seed {seed}: test acc {acc:.3f}, {subsets} subset models in {subsets_s:.0f} s")
    return {"seed": seed, "test_accuracy": acc, "train_s": train_s, "subsets_s": subsets_s,
            "mean_diag": mean_diag, "rows": rows}  # fmt: skip


def mislabel_study(seed: int, grid: list[float], ms: list[int], share: float = 0.1):
    xtr, ytr, xte, yte = digits(seed)
    gen = torch.Generator().manual_seed(2000 + seed)
    flipped = torch.zeros(N_TRAIN, dtype=torch.bool)
    flipped[torch.randperm(N_TRAIN, generator=gen)[: int(share * N_TRAIN)]] = True
    noisy = ytr.clone()
    shift = torch.randint(1, 10, (int(flipped.sum()),), generator=gen)
    noisy[flipped] = (ytr[flipped] + shift) % 10  # a different class
    model = fit(seed, xtr, noisy)
    with torch.no_grad():
        train_loss = ce(model(xtr), noisy, reduction="none")
    g = per_example(model, xtr, noisy)
    mean_diag = float(g.double().square().mean())
    rows = method_rows(model, (xtr, noisy), (xte, yte), grid, mean_diag, ms, self_only=True)
    for row in rows:
        if "scores" in row:
            row["auc"] = auc(flipped, row.pop("scores"))
    rows.append({"method": "training loss (reference)", "damp_rel": None,
                 "auc": auc(flipped, train_loss), "seconds": 0.0, "bytes": 0})  # fmt: skip
    return {"seed": seed, "rows": rows}


# --------------------------------------------------------------------------- reports
def summarise(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per (method, damp_rel): mean and sd over seeds of ``metric``, seconds and MB; then each
    method at the damp_rel with the best mean."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault((row["method"], row["damp_rel"]), []).append(row)
    grid_rows = []
    for (method, rel), rows in groups.items():
        entry: dict[str, Any] = {"method": method, "damp_rel": rel}
        vals = [r[metric] for r in rows if metric in r]
        if vals:
            entry[metric] = statistics.mean(vals)
            entry[metric + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            entry[metric + "_per_seed"] = vals
            entry["seconds"] = statistics.mean(r["seconds"] for r in rows)
            entry["MB"] = statistics.mean(r["bytes"] for r in rows) / 2**20
        else:
            entry["error"] = rows[0].get("error", "")
        grid_rows.append(entry)
    best: dict[str, dict[str, Any]] = {}
    for entry in grid_rows:
        cur = best.get(entry["method"])
        if cur is None or entry.get(metric, -2.0) > cur.get(metric, -2.0):
            best[entry["method"]] = entry
    return [best[k] for k in best]


def plot(payload: dict[str, Any], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, metric, label in (
        (axes[0], "lds_best", "lds", "LDS (Spearman over subset models; mean over seeds)"),
        (axes[1], "auc_best", "auc", "mislabel AUC (self-influence; mean over seeds)"),
    ):
        rows = [r for r in payload[key] if metric in r]
        ax.barh(
            [f"{r['method']} ({r['damp_rel']})" for r in rows],
            [r[metric] for r in rows],
            xerr=[r[metric + "_sd"] for r in rows],
        )
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=7)
        if metric == "auc":  # every method is near 1: show the differences
            ax.set_xlim(0.9, 1.0)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def markdown(payload: dict[str, Any]) -> str:
    lds_cols = ["method", "damp_rel", "lds", "lds_sd", "lds_per_seed", "seconds", "MB", "error"]
    auc_cols = ["method", "damp_rel", "auc", "auc_sd", "seconds", "MB", "error"]

    def fmt(rows, metric):
        out = []
        for r in rows:
            r = dict(r)
            if metric + "_per_seed" in r:
                r[metric + "_per_seed"] = ", ".join(f"{v:.3f}" for v in r[metric + "_per_seed"])
            out.append(r)
        return out

    return "\n\n".join(
        [
            table(fmt(payload["lds_best"], "lds"), lds_cols),
            grid_table(payload["lds"], "lds"),
            table(fmt(payload["auc_best"], "auc"), auc_cols),
        ]
    )


def grid_table(runs: list[dict[str, Any]], metric: str) -> str:
    """Mean ``metric`` over the seeds for every damped method (columns) at every damp_rel."""
    means: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            if row["damp_rel"] is not None and metric in row:
                means.setdefault((row["method"], row["damp_rel"]), []).append(row[metric])
    methods = list(dict.fromkeys(k[0] for k in means))
    rels = sorted({k[1] for k in means})
    rows = [
        {"damp_rel": rel, **{m: statistics.mean(means[(m, rel)]) for m in methods}} for rel in rels
    ]
    return table(rows, ["damp_rel", *methods])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subsets", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", action="store_true", help="print the docs' tables from JSON")
    args = parser.parse_args()
    name = "curvature_lds_quick" if args.quick else "curvature_lds"
    if args.tables:  # the tables (and the figure) again from the JSON
        payload = json.loads((RESULTS / f"{name}.json").read_text())
        plot(payload, name)
        print(markdown(payload))
        return
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [0, 1, 2]
    subsets = args.subsets or (30 if args.quick else 100)
    grid = [1e-1, 1.0] if args.quick else [1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 100.0]
    ms = [100, 300, N_TRAIN]
    start = time.perf_counter()
    lds_runs = [lds_study(s, subsets, grid, ms) for s in seeds]
    auc_runs = [mislabel_study(s, grid, ms) for s in seeds]
    payload = {
        "machine": machine(),
        "commit": git_commit(),
        "seeds": seeds,
        "subsets": subsets,
        "grid": grid,
        "setup": {"n_train": N_TRAIN, "n_test": N_TEST, "steps": STEPS, "lr": LR, "wd": WD},
        "lds": lds_runs,
        "mislabel": auc_runs,
        "lds_best": summarise(lds_runs, "lds"),
        "auc_best": summarise(auc_runs, "auc"),
        "wall_s": 0.0,
        "peak_rss_gib": 0.0,
    }
    payload["wall_s"] = time.perf_counter() - start
    payload["peak_rss_gib"] = peak_rss_gib()
    print("wrote", write_json(name, payload))
    plot(payload, name)
    print(markdown(payload))
    print(f"wall {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
