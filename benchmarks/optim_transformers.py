"""Optimizers on a tiny BERT trained from scratch (examples/hf_trainer.py's task: scikit-learn
digits read as 64 pixel tokens): AdamW, Muon (+AdamW), SOAP, plain M-FAC (mfac.MFACSGD) and the
scale-aware window preconditioners of mfac.MFAC. Each optimizer gets a learning-rate sweep; the lr
is chosen on a validation split (mean over seeds) and the test accuracy is reported there.

    PYTHONPATH=src python -m benchmarks.optim_transformers run --opt adamw --lrs 3e-4 1e-3 3e-3
    PYTHONPATH=src python -m benchmarks.optim_transformers report

``run`` appends one record per (optimizer, lr, seed) to results/optim_transformers.json
(existing records are kept, so the grid can be filled in pieces); ``report`` writes the table
(markdown, printed) and results/optim_transformers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from sklearn.datasets import load_digits

from mfac.optim import MFAC, MFACSGD

from .common import RESULTS, interleaved_medians

OUT = RESULTS / "optim_transformers.json"
RUNS = RESULTS / "optim_transformers_runs"  # one file per optimizer label, merged by report
BATCH = 32
WEIGHT_DECAY = 0.01


def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The example's split (first 1400 train, last 397 test), with the last 200 of train held
    out for validation: [CLS]=0 followed by the 64 pixel values + 1."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    ids = torch.tensor(x[perm].astype(int), dtype=torch.long) + 1
    ids = torch.cat([torch.zeros(len(ids), 1, dtype=torch.long), ids], 1)
    labels = torch.tensor(y[perm], dtype=torch.long)
    return {
        "train": (ids[:1200], labels[:1200]),
        "val": (ids[1200:1400], labels[1200:1400]),
        "test": (ids[1400:], labels[1400:]),
    }


def tiny_bert(seed: int) -> transformers.BertForSequenceClassification:
    """examples/hf_trainer.py's model: 2 layers, hidden 64, 2 heads, random init from ``seed``."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=18,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=65,
        num_labels=10,
    )
    return transformers.BertForSequenceClassification(cfg)


def decay_groups(model: torch.nn.Module, names: set[str] | None = None) -> list[dict[str, Any]]:
    """Trainer's two groups: weight decay on everything but biases and LayerNorm."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    decay = [p for n, p in named if "bias" not in n and "LayerNorm" not in n]
    rest = [p for n, p in named if "bias" in n or "LayerNorm" in n]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


class Paired:
    """Two optimizers stepped together (Muon for hidden matrices, AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)


def make_optimizer(
    name: str, model: torch.nn.Module, lr: float, extra: dict[str, Any] | None = None
) -> Any:
    """Every optimizer of the study, with its documented defaults besides lr and ``extra``."""
    extra = extra or {}
    if name == "adamw":
        return torch.optim.AdamW(decay_groups(model), lr=lr, **extra)
    if name == "muon":
        # Muon for the 2-D hidden matrices (attention, FFN, pooler); AdamW for embeddings,
        # the classifier head, biases and LayerNorm, as torch.optim.Muon's docs advise.
        # match_rms_adamw scales Muon's update to AdamW's RMS, so both share one lr.
        hidden = {
            n
            for n, p in model.named_parameters()
            if p.ndim == 2 and "embeddings" not in n and "classifier" not in n
        }
        rest = {n for n, _ in model.named_parameters()} - hidden
        muon = torch.optim.Muon(
            [p for n, p in model.named_parameters() if n in hidden],
            lr=lr,
            weight_decay=WEIGHT_DECAY,
            adjust_lr_fn="match_rms_adamw",
        )
        return Paired(muon, torch.optim.AdamW(decay_groups(model, rest), lr=lr))
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, **extra)
    if name == "mfac-default":  # MFAC(params, lr) with every default
        return MFAC(decay_groups(model), lr=lr, **extra)
    if name in DEFAULT_VARIANTS:  # MFAC(params, lr, **options): the default rule, other window
        return MFAC(decay_groups(model), lr=lr, **{**DEFAULT_VARIANTS[name], **extra})
    if name == "mfac":  # the paper's step with every default (ngrads=1024, damp=1e-5)
        return MFACSGD(decay_groups(model), lr=lr)
    if name == "mfac-m128":  # the example's former settings
        return MFACSGD(decay_groups(model), lr=lr, ngrads=128, damp=1e-4)
    if name in CANDIDATES:
        return MFAC(decay_groups(model), lr=lr, **{**CANDIDATES[name], **extra})
    raise ValueError(f"unknown optimizer {name!r}")


# The scale-aware designs (mfac.MFAC's options); relative_damp scales the window's mean eigenvalue.
# Each is ungrafted, as in the study that compared them; --options '{"graft": true}' grafts.
CANDIDATES: dict[str, dict[str, Any]] = {
    "adam-mfac": {"power": 1.0, "whiten": "adam", "window_scope": "model", "graft": False},
    "adam-mfac-tensor": {"power": 1.0, "whiten": "adam", "window_scope": "tensor", "graft": False},
    "adam-ggt": {"power": 0.5, "whiten": "adam", "window_scope": "model", "graft": False},
    "adam-ggt-tensor": {"power": 0.5, "whiten": "adam", "window_scope": "tensor", "graft": False},
    "ggt": {"power": 0.5, "whiten": "none", "window_scope": "model", "graft": False},
    "ggt-tensor": {"power": 0.5, "whiten": "none", "window_scope": "tensor", "graft": False},
}
# MFAC's default rule (grafted per tensor) on one window over the whole model: dense, or
# error-feedback top-k rows at a density (the runs pass the same options to mfac-default).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "mfac-global-dense": {"window_scope": "model"},
    "mfac-global-topk10": {"window_scope": "model", "layout": "topk", "topk": 0.1},
    "mfac-global-topk1": {"window_scope": "model", "layout": "topk", "topk": 0.01},
    "mfac-global-topk10-m128": {
        "window_scope": "model", "layout": "topk", "topk": 0.1, "ngrads": 128
    },
    "mfac-global-topk1-m128": {
        "window_scope": "model", "layout": "topk", "topk": 0.01, "ngrads": 128
    },
}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    model.eval()
    ids, labels = data
    out = model(input_ids=ids, labels=labels)
    model.train()
    acc = float((out.logits.argmax(-1) == labels).float().mean())
    return {"accuracy": acc, "loss": float(out.loss)}


def train_one(
    name: str, lr: float, seed: int, steps: int, extra: dict[str, Any], label: str
) -> dict[str, Any]:
    """Train from scratch for ``steps`` steps; return val/test metrics and step() timing."""
    torch.set_num_threads(1)
    splits = digits_splits()
    model = tiny_bert(seed)
    model.train()
    opt = make_optimizer(name, model, lr, extra)
    inner = opt.opts if isinstance(opt, Paired) else (opt,)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 - s / steps) for o in inner]
    gen = torch.Generator().manual_seed(seed)
    ids, labels = splits["train"]
    order = torch.randperm(len(labels), generator=gen)
    pos, losses, step_s = 0, [], 0.0
    start = time.perf_counter()
    for _ in range(steps):
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos : pos + BATCH]
        pos += BATCH
        opt.zero_grad()
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t0 = time.perf_counter()
        opt.step()
        step_s += time.perf_counter() - t0
        for s in scheds:
            s.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            break
    return {
        "optimizer": label,
        "base": name,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "options": extra,
        "train_loss_last50": float(np.mean(losses[-50:])),
        "loss_curve": [float(np.mean(losses[i : i + 10])) for i in range(0, len(losses), 10)],
        "val": evaluate(model, splits["val"]),
        "test": evaluate(model, splits["test"]),
        "step_s": step_s / max(len(losses), 1),
        "wall_s": time.perf_counter() - start,
    }


def load(label: str | None = None) -> list[dict[str, Any]]:
    """Every record (or one label's), from the per-label files."""
    files = sorted(RUNS.glob("*.json")) if label is None else [RUNS / f"{label}.json"]
    return [r for f in files if f.exists() for r in json.loads(f.read_text())]


def save(label: str, runs: list[dict[str, Any]]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"{label}.json").write_text(json.dumps(runs))


def summarize(runs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Per optimizer: the lr with the best mean val accuracy, and test accuracy there."""
    rows = []
    names = sorted({r["optimizer"] for r in runs if r["steps"] == steps})
    adamw_step = [r["step_s"] for r in runs if r["optimizer"] == "adamw" and r["steps"] == steps]
    base = statistics.median(adamw_step) if adamw_step else float("nan")
    for name in names:
        mine = [r for r in runs if r["optimizer"] == name and r["steps"] == steps]
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)

        def val_mean(lr: float, by_lr: dict = by_lr) -> float:
            return statistics.mean(r["val"]["accuracy"] for r in by_lr[lr])

        best = max(by_lr, key=val_mean)
        chosen = by_lr[best]
        test = [r["test"]["accuracy"] for r in chosen]
        tloss = [r["test"]["loss"] for r in chosen]
        rows.append(
            {
                "optimizer": name,
                "lr": best,
                "lrs": sorted(by_lr),
                "val_by_lr": {str(lr): round(val_mean(lr), 4) for lr in sorted(by_lr)},
                "seeds": len(chosen),
                "val_acc": val_mean(best),
                "test_acc": statistics.mean(test),
                "test_acc_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "test_loss": statistics.mean(tloss),
                "step_ratio": statistics.median(r["step_s"] for r in mine) / base,
                "step_ms": 1e3 * statistics.median(r["step_s"] for r in mine),
            }
        )
    return sorted(rows, key=lambda r: -r["test_acc"])


def report(steps: int) -> str:
    """Markdown tables: optimizers with an lr sweep, then variants run at one or two lrs, then
    extra seeds; step() ratios from the one-process timing run where it exists."""
    runs = load()
    OUT.write_text(json.dumps({"task": "tiny BERT from scratch on digits tokens", "runs": runs}))
    rows = summarize(runs, steps)
    timing_file = RESULTS / "optim_transformers_timing.json"
    ratios = json.loads(timing_file.read_text())["ratio_vs_adamw"] if timing_file.exists() else {}
    head = [
        "| optimizer | lr (val-chosen) | val acc | test acc (mean ± std) | test loss | seeds "
        "| step() / AdamW |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def line(r: dict[str, Any]) -> str:
        rec = next(x for x in runs if x["optimizer"] == r["optimizer"])
        # other options do not change the cost
        same_cost = not {"ngrads", "window_scope", "layout", "topk"} & set(rec["options"])
        ratio = ratios.get(r["optimizer"], ratios.get(rec["base"]) if same_cost else None)
        ratio_text = f"{ratio:.1f}" if ratio is not None else "-"
        return (
            f"| {r['optimizer']} | {r['lr']:g} | {r['val_acc']:.3f} | {r['test_acc']:.3f} ± "
            f"{r['test_acc_std']:.3f} | {r['test_loss']:.3f} | {r['seeds']} | {ratio_text} |"
        )

    swept = [r for r in rows if len(r["lrs"]) >= 3]
    variants = [r for r in rows if len(r["lrs"]) < 3 and not r["optimizer"].startswith("seeds")]
    extra = [r for r in rows if r["optimizer"].startswith("seeds")]
    lines = ["Optimizers with a learning-rate sweep:", "", *head, *map(line, swept)]
    lines += ["", "Variants at one or two learning rates:", "", *head, *map(line, variants)]
    lines += ["", "Seeds 3 and 4 at the chosen lr:", "", *head, *map(line, extra)]
    if extra:
        lines += [
            "",
            "All five seeds at the chosen lr:",
            "",
            "| optimizer | lr | test acc (mean ± std, 5 seeds) |",
            "| --- | --- | --- |",
        ]
        for r in extra:
            name = r["optimizer"].removeprefix("seeds34-")
            five = [
                x["test"]["accuracy"]
                for x in runs
                if x["optimizer"] in (name, r["optimizer"])
                and x["lr"] == r["lr"]
                and x["steps"] == steps
            ]
            lines.append(
                f"| {name} | {r['lr']:g} | {statistics.mean(five):.3f} ± "
                f"{statistics.stdev(five):.3f} ({len(five)} runs) |"
            )
    lines += ["", "| optimizer | mean val accuracy per lr |", "| --- | --- |"]
    for r in rows:
        sweep = ", ".join(f"{lr}: {v:.3f}" for lr, v in r["val_by_lr"].items())
        lines.append(f"| {r['optimizer']} | {sweep} |")
    if timing_file.exists():
        t = json.loads(timing_file.read_text())
        lines += [
            "",
            f"step() in one process (d = {t['dim']:,}, one thread, median of round-robin reps):",
            "",
            "| optimizer | step() ms | / AdamW | state bytes |",
            "| --- | --- | --- | --- |",
        ]
        for name, ms in sorted(t["step_ms"].items(), key=lambda kv: kv[1]):
            nbytes = t["state_bytes"].get(name)
            state = f"{nbytes / 1e6:.1f} MB" if nbytes else "-"
            lines.append(f"| {name} | {ms:.1f} | {t['ratio_vs_adamw'][name]:.1f} | {state} |")
    text = "\n".join(lines)
    summary = RESULTS / "optim_transformers_summary.json"
    summary.write_text(json.dumps({"steps": steps, "rows": rows}, indent=1))
    plot(runs, swept, steps)
    return text


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        chosen = [
            x
            for x in runs
            if x["optimizer"] == r["optimizer"] and x["lr"] == r["lr"] and x["steps"] == steps
        ]
        curve = np.mean([c["loss_curve"] for c in chosen if len(c["loss_curve"]) == steps // 10], 0)
        ax1.plot(np.arange(len(curve)) * 10, curve, label=f"{r['optimizer']} (lr {r['lr']:g})")
    ax1.set(xlabel="step", ylabel="train loss (10-step means, 3 seeds)", yscale="log")
    ax1.set_ylim(0.5, 3.0)  # plain M-FAC at lr 1e-2 starts far above (up to 30) and is clipped
    ax1.legend(fontsize=7)
    names = [r["optimizer"] for r in rows]
    ax2.bar(names, [r["test_acc"] for r in rows], yerr=[r["test_acc_std"] for r in rows])
    ax2.set(ylabel="test accuracy at the val-chosen lr", ylim=(0, 1))
    ax2.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "optim_transformers.png", dpi=110)


def timing(names: list[str], reps: int = 30, out_file: str | None = None) -> dict[str, Any]:
    """Median step() time of every optimizer on the same model and gradient, measured round-robin
    in one process (so machine noise hits all alike); ratios against AdamW."""
    torch.set_num_threads(1)
    splits = digits_splits()
    ids, labels = splits["train"]
    models, opts = {}, {}
    for name in names:
        models[name] = tiny_bert(0)
        models[name](input_ids=ids[:BATCH], labels=labels[:BATCH]).loss.backward()
        opts[name] = make_optimizer(name, models[name], 1e-4)
    fns = {name: opts[name].step for name in names}
    for fn in fns.values():  # fill the windows a little first, and warm up
        for _ in range(3):
            fn()
    med = interleaved_medians(fns, reps)
    d = sum(p.numel() for p in models[names[0]].parameters())
    out = {
        "dim": d,
        "step_ms": {n: 1e3 * t for n, t in med.items()},
        "ratio_vs_adamw": {n: t / med["adamw"] for n, t in med.items()},
        "state_bytes": {n: getattr(o, "state_nbytes", None) for n, o in opts.items()},
    }
    path = RESULTS / (out_file or "optim_transformers_timing.json")
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--opt", required=True)
    run.add_argument("--lrs", type=float, nargs="+", required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--options", default="{}", help="JSON overrides for a candidate's options")
    run.add_argument("--label", default=None, help="name to record (default: --opt)")
    tim = sub.add_parser("timing")
    tim.add_argument("--opts", nargs="+", required=True)
    tim.add_argument("--out", default=None, help="file in results/ (default: the main table's)")
    rep = sub.add_parser("report")
    rep.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if args.cmd == "timing":
        print(json.dumps(timing(args.opts, out_file=args.out), indent=1))
        return
    if args.cmd == "report":
        print(report(args.steps))
        return
    extra = json.loads(args.options)
    label = args.label or args.opt
    for lr in args.lrs:
        for seed in args.seeds:
            rec = train_one(args.opt, lr, seed, args.steps, extra, label)
            key = (lr, seed, args.steps)
            runs = [r for r in load(label) if (r["lr"], r["seed"], r["steps"]) != key]
            save(label, [*runs, rec])
            print(
                f"{args.opt} lr={lr:g} seed={seed}: val {rec['val']['accuracy']:.3f} "
                f"test {rec['test']['accuracy']:.3f} loss {rec['train_loss_last50']:.3f} "
                f"step {1e3 * rec['step_s']:.1f} ms wall {rec['wall_s']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
