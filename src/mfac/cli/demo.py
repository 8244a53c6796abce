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
        report,
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
        report(results, tmp, line_plot, Report).write(tmp)
        write_json(tmp / "results.json", results)
    emit(
        f"\ndone in {results['wall_s']:.0f} s; report: {out.resolve() / 'index.html'} "
        f"(also report.md, PNGs, results.json)"
    )
    return 0
