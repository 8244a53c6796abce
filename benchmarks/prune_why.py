"""Why one-step M-FAC pruning (summed single-weight OBS updates) collapses at 90-95 % on the
small MLPs while recomputation and mfac-exact do not: a diagnostic grid.

For each run it records the test accuracy and, from an independent float64 oracle of the same
blocked damped empirical Fisher the pruner uses (dense model, same gradients, B = 128, relative
damping 1e-2), four loss increases on the training set:

- ``pred_sum``: the sum of the OBS saliencies w_q^2 / (2 [F^-1]_qq) of the pruned weights (what
  one-step mfac believes it costs);
- ``pred_joint``: 0.5 w_P^T ([F^-1]_PP)^-1 w_P per block, the quadratic model's cost of removing
  that mask jointly with the correlated update (what mfac-exact optimises);
- ``quad_applied``: g^T d + 0.5 d^T F d of the perturbation d actually applied (full empirical
  Fisher, not blocked), the quadratic model's view of the weights the pruner produced;
- ``actual``: the true cross-entropy increase on the training set.

Labels ``+joint`` re-apply, to the mask of the run named before it, the correct correlated block
update instead of the summed one (a diagnostic, not a library method).

    PYTHONPATH=src /work/cpu-slot .venv/bin/python -m benchmarks.prune_why

Writes benchmarks/results/prune_why.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import mfac.prune as mp

from .prune import Task, accuracy, batches, load_tasks, loss_fn, train

RESULTS = Path(__file__).parent / "results"
BLOCK = 128
DAMP = 1e-2


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().reshape(-1) for m in linears(model)]).double()


def padded(vec: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-layer chunks of the last dim padded to multiples of BLOCK (blocks never straddle
    layers, as in the library's layout), then reshaped to (..., blocks, BLOCK)."""
    parts, o = [], 0
    for n in sizes:
        chunk = vec[..., o : o + n]
        pad = (-n) % BLOCK
        parts.append(nn.functional.pad(chunk, (0, pad)))
        o += n
    out = torch.cat(parts, -1)
    return out.reshape(*out.shape[:-1], -1, BLOCK)


class Oracle:
    """Dense model's blocked damped empirical Fisher (float64), its inverse, the full
    empirical-Fisher quadratic model, and the true training loss."""

    def __init__(self, task: Task, state: dict, seed: int, m: int = 256) -> None:
        model = task.make()
        model.load_state_dict(state)
        model.eval()
        self.task = task
        self.sizes = [lin.weight.numel() for lin in linears(model)]
        grads = []
        for batch in batches(task, m, seed + 100, 32):  # the pruner's own gradient batches
            model.zero_grad()
            loss_fn(model, batch).backward()
            grads.append(torch.cat([lin.weight.grad.reshape(-1) for lin in linears(model)]))
        g = torch.stack(grads).double()  # m x d
        self.G = g
        self.gmean = g.mean(0)
        self.lam = DAMP * float(g.square().mean(0).mean())
        gb = padded(g, self.sizes)  # m x nb x B
        f = torch.einsum("mnb,mnc->nbc", gb, gb) / m
        f += self.lam * torch.eye(BLOCK, dtype=torch.float64)
        self.finv = torch.linalg.inv(f)
        self.dinv = torch.diagonal(self.finv, dim1=1, dim2=2)
        self.w0 = flat_weights(model)
        self.loss0 = self.train_loss(model)

    def train_loss(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model, (self.task.x_train, self.task.y_train)))

    def predictions(self, pruned: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
        w = padded(self.w0, self.sizes)
        p = padded(pruned.double(), self.sizes)
        pred_sum = float((p * w.square() / (2 * self.dinv)).sum())
        a = p.unsqueeze(-1) * p.unsqueeze(-2) * self.finv + torch.diag_embed(1 - p)
        x = torch.linalg.solve(a, (p * w).unsqueeze(-1)).squeeze(-1)
        pred_joint = float(0.5 * (p * w * x).sum())
        d = w1 - self.w0
        gd = self.G @ d
        quad = float(self.gmean @ d + 0.5 * (self.lam * d @ d + gd @ gd / len(gd)))
        return {"pred_sum": pred_sum, "pred_joint": pred_joint, "quad_applied": quad}

    def joint_update(self, pruned: torch.Tensor) -> torch.Tensor:
        """Dense weights with the mask removed by the exact correlated block OBS update."""
        w = padded(self.w0, self.sizes)
        p = padded(pruned.double(), self.sizes)
        a = p.unsqueeze(-1) * p.unsqueeze(-2) * self.finv + torch.diag_embed(1 - p)
        x = torch.linalg.solve(a, (p * w).unsqueeze(-1)).squeeze(-1)
        w1 = w - torch.einsum("nbc,nc->nb", self.finv, x)
        w1 = w1 * (1 - p)
        flat, o, parts = w1.reshape(-1), 0, []
        for n in self.sizes:
            parts.append(flat[o : o + n])
            o += n + (-n) % BLOCK
        return torch.cat(parts)


def measure(oracle: Oracle, model: nn.Module) -> dict:
    w1 = flat_weights(model)
    pruned = w1 == 0
    out = oracle.predictions(pruned, w1)
    out["actual"] = oracle.train_loss(model) - oracle.loss0
    out["dense_train_loss"] = oracle.loss0
    out["acc"] = accuracy(model, oracle.task)
    out["achieved"] = float(pruned.double().mean())
    return out


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    o = 0
    with torch.no_grad():
        for lin in linears(model):
            n = lin.weight.numel()
            lin.weight.copy_(flat[o : o + n].view_as(lin.weight).float())
            o += n


def grid(full: bool) -> list[tuple[str, str, dict]]:
    g = [
        ("magnitude", "magnitude", {}),
        ("mfac", "mfac", {}),
        ("mfac no-update", "mfac", {"update": False}),
        ("mfac r4", "mfac", {"recompute": 4}),
        ("mfac r16", "mfac", {"recompute": 16}),
        ("mfac r16 no-update", "mfac", {"recompute": 16, "update": False}),
        ("mfac-exact", "mfac-exact", {}),
    ]
    if full:
        g += [
            ("mfac m64", "mfac", {"num_grads": 64}),
            ("mfac m1024", "mfac", {"num_grads": 1024}),
            ("mfac damp1e-4", "mfac", {"damp": 1e-4}),
            ("mfac damp1e-1", "mfac", {"damp": 1e-1}),
            ("mfac B32", "mfac", {"block_size": 32}),
            ("mfac B1024", "mfac", {"block_size": 1024}),
        ]
    return g


def _mean(vals: list[float]) -> str:
    if not vals:
        return "-"
    mu = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mu:.3f}".lstrip("0") if abs(mu) < 1 else f"{mu:.3f}"
    sd = (sum((v - mu) ** 2 for v in vals) / len(vals)) ** 0.5
    return f"{mu:.3f} ± {sd:.3f}".replace("0.", ".", 1).replace(" 0.", " .")


KEY_RUNS = ("magnitude", "mfac", "mfac no-update", "mfac +joint", "mfac r16",
            "mfac r16 no-update", "mfac-exact")  # fmt: skip


def summary_table(rows: list[dict]) -> str:
    """Markdown: per run, accuracy / joint-over-sum ratio / actual loss increase at 90 and 95 %,
    means over the seeds that ran every key run."""
    head = "| run |"
    cells: dict[str, str] = {lab: f"| {lab} |" for lab in KEY_RUNS}
    for model in sorted({r["model"] for r in rows}):
        for s in (0.9, 0.95):
            head += f" {model} {s:.0%}: acc / joint÷sum / ΔL |"
            for lab in KEY_RUNS:
                rs = [r for r in rows if (r["model"], r["sparsity"], r["label"]) == (model, s, lab)]
                n = len(rs)
                acc = sum(r["acc"] for r in rs) / n
                ratio = sum(r["pred_joint"] / r["pred_sum"] for r in rs) / n
                actual = sum(r["actual"] for r in rs) / n
                cells[lab] += f" {acc:.3f} / {ratio:.1f} / {actual:.2f} |".replace(" 0.", " .")
    return "\n".join([head, "|---" * (head.count("|") - 1) + "|", *cells.values()])


def tables(rows: list[dict]) -> str:
    """Markdown: accuracy per label and sparsity, then the loss increases at 90 % and 95 %."""
    lines = []
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        seeds = sorted({r["seed"] for r in rs})
        sps = sorted({r["sparsity"] for r in rs})
        labels = list(dict.fromkeys(r["label"] for r in rs))
        lines += [f"\n{model}: test accuracy (seeds {seeds}; one seed where no ± is shown)\n"]
        lines += ["| run | " + " | ".join(f"{s:.0%}" for s in sps) + " |"]
        lines += ["|---" * (len(sps) + 1) + "|"]
        for lab in labels:
            cells = [_mean([r["acc"] for r in rs if r["label"] == lab and r["sparsity"] == s])
                     for s in sps]  # fmt: skip
            lines += [f"| {lab} | " + " | ".join(cells) + " |"]
        for s in (0.9, 0.95):
            lines += [f"\n{model} at {s:.0%}, seed {seeds[0]}: training-loss increase (nats)\n"]
            lines += ["| run | acc | saliency sum | joint OBS (blocked F) | quadratic, applied "
                      "(full F) | actual |", "|---|---|---|---|---|---|"]  # fmt: skip
            for r in rs:
                if r["seed"] == seeds[0] and r["sparsity"] == s:
                    lines += [
                        f"| {r['label']} | {r['acc']:.3f} | {r['pred_sum']:.2e} | "
                        f"{r['pred_joint']:.2e} | {r['quad_applied']:.2e} | {r['actual']:.3f} |"
                    ]
    return "\n".join(lines) + "\n\n" + summary_table(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits-mlp", "mnist-mlp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    ap.add_argument("--out", default=str(RESULTS / "prune_why.json"))
    ap.add_argument("--tables", action="store_true", help="print the markdown tables and exit")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads(Path(args.out).read_text())["rows"]))
        return
    torch.set_num_threads(1)
    tasks = load_tasks()
    out_path = Path(args.out)
    rows: list[dict] = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    done = {(r["model"], r["seed"], r["sparsity"], r["label"]) for r in rows}
    t_start = time.perf_counter()
    for name in args.models:
        task = tasks[name]
        for seed in args.seeds:
            state = train(task, seed)
            oracle = Oracle(task, state, seed)
            for s in args.sparsities:
                for label, method, opts in grid(full=seed == args.seeds[0]):
                    if (name, seed, s, label) in done:
                        continue
                    model = task.make()
                    model.load_state_dict(state)
                    m = int(opts.get("num_grads", 256))
                    kw = {} if method == "magnitude" else {"num_grads": m}
                    data = batches(task, m, seed + 100, 32)
                    t0 = time.perf_counter()
                    mp.oneshot(
                        model, s, method, data=data, loss_fn=loss_fn, progress=False,
                        **{**opts, **kw},
                    )  # fmt: skip
                    wall = time.perf_counter() - t0
                    row = {"model": name, "seed": seed, "sparsity": s, "label": label,
                           "wall_s": wall, **measure(oracle, model)}  # fmt: skip
                    rows.append(row)
                    if label in ("mfac", "mfac r16"):  # same mask, correct correlated update
                        pruned = flat_weights(model) == 0
                        load_flat(model, oracle.joint_update(pruned))
                        joint = {"label": label + " +joint", **measure(oracle, model)}
                        rows.append({"model": name, "seed": seed, "sparsity": s, **joint})
                    print(
                        f"{name} s{seed} {s:.2f} {label:20s} acc {row['acc']:.3f} "
                        f"sum {row['pred_sum']:.3g} joint {row['pred_joint']:.3g} "
                        f"quad {row['quad_applied']:.3g} actual {row['actual']:.3g} "
                        f"({wall:.1f}s)",
                        flush=True,
                    )
            out_path.write_text(json.dumps({"threads": 1, "block": BLOCK, "oracle_damp": DAMP,
                                            "rows": rows}, indent=1))  # fmt: skip
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
